"""Every command in README.md is exercised by a test, so a wrong flag fails CI and not a user.

Commands are the lines of fenced ``bash``/``sh``/``shell``/``console`` blocks (``\\`` continuations
joined, ``#`` comments dropped, ``a && b`` split, an optional ``[--flag value]`` tried without and
with) and the inline code spans that start with a program (``python``, ``torchrun``, ``bash``,
``dirmoe-*``, ...). Each must match exactly one rule of :data:`RULES`, which says how it is
checked:

- ``run``: executed here, training commands with :func:`user_runs.tiny_overrides` appended (a few
  iterations, outputs under a temporary folder; the last value of a flag wins);
- ``parse``: needs a GPU, a cluster or minutes of benchmarking, so its arguments go through the
  real argument parser (a misspelt flag fails) and the rule names what runs it elsewhere;
- ``ci``: installs packages; checked against what CI (``.ci/run`` on a fresh clone) runs.

A README command that matches no rule fails `test_every_readme_command_has_a_rule`: add a rule
(and, where it needs one, a test) in the same change.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from user_runs import BIN, REPO, run_pretrain, user_env

README = REPO / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
_PROGRAM = re.compile(
    r"^(?:[A-Z][A-Z0-9_]*=\S*\s+)*(?:time\s+)?(?:\.venv/bin/)?"
    r"(?:python3?|torchrun|bash|sh|sbatch|srun|pip|pytest|tensorboard|dirmoe-[a-z]+)(?:\s|$)")


def _argv_variants(line: str) -> list[list[str]]:
    """Tokens of one command line (comments dropped, `<a b>` placeholders kept as one token),
    split at `&&`, with an optional `[...]` group tried without and with."""
    line = re.sub(r"<([^<>]+)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", line)
    optional = re.search(r"\s\[([^\]]+)\]", line)
    lines = ([line.replace(optional.group(0), ""),
              line.replace(optional.group(0), " " + optional.group(1))] if optional else [line])
    out = []
    for text in lines:
        part: list[str] = []
        for token in shlex.split(text, comments=True) + ["&&"]:
            if token == "&&":
                if part:
                    out.append(part)
                part = []
            else:
                part.append(token)
    return out


def canonical(argv: list[str]) -> list[str]:
    """`time` dropped and `.venv/bin/<program>` shortened to `<program>` (the tests run the
    programs of the interpreter they run under, whose bin is on PATH)."""
    argv = list(argv)
    if argv and argv[0] == "time":
        argv = argv[1:]
    env = 0
    while env < len(argv) and re.match(r"^[A-Z][A-Z0-9_]*=", argv[env]):
        env += 1
    if env < len(argv):
        argv[env] = argv[env].removeprefix(".venv/bin/")
    return argv


def readme_commands(text: str) -> list[str]:
    lines = []
    for match in _FENCE.finditer(text):
        if match.group(1) in SHELL_LANGS:
            for line in match.group(2).replace("\\\n", " ").splitlines():
                if line.strip() and not line.strip().startswith("#"):
                    lines.append(line.strip())
    for span in re.findall(r"`([^`]+)`", _FENCE.sub("", text)):
        span = " ".join(span.split())
        if _PROGRAM.match(span) and " " in span:  # a lone `dirmoe-pretrain` names the program
            lines.append(span)
    commands = []
    for line in lines:
        for argv in _argv_variants(line):
            command = " ".join(canonical(argv))
            if command not in commands:
                commands.append(command)
    return commands


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: str  # full match on the canonical command
    how: str  # run | parse | ci
    note: str = ""  # parse / ci: why not run here, and what runs it


RULES = (
    Rule("setup-venv", r"(DIRMOE_UNPINNED=1 )?bash scripts/setup_venv\.sh( dev)?", "ci",
         "installs packages: .ci/run runs it on a fresh clone"),
    Rule("ci", r"(DIRMOE_CI_NEWEST=1 )?bash \.ci/run", "ci", "the CI entry point itself"),
    Rule("pytest", r"python -m pytest -q", "ci", "the test suite itself, as .ci/run runs it"),
    Rule("pip-install", r"pip install \S+", "ci",
         "installs from the network: an extra of pyproject.toml, or the optional package the "
         "code names in its error (wandb: tests/unit/test_startup_and_logs.py)"),
    Rule("install-into-env", r"(PYTHON=\S+ )?bash scripts/install_into_env\.sh( dev)?", "ci",
         "installs packages: tests/unit/test_install.py runs it offline into a venv that has "
         "another torch patch version than the lock"),
    Rule("install-plan", r"python scripts/install_plan\.py (torch-index|constraints)( .*)?",
         "run"),
    Rule("freeze-constraints", r"bash scripts/freeze_constraints\.sh", "run"),
    Rule("pretrain-cpu", r"(dirmoe-pretrain|python -m megatron_dirmoe\.pretrain)( .*)?", "run"),
    Rule("pretrain-gpu", r"torchrun .* -m megatron_dirmoe\.pretrain .*", "parse",
         "GPU: tests/gpu/test_pretrain_gpu.py runs the megatron.training path on one GPU"),
    Rule("slurm-dry-run", r"DRY_RUN=1 bash slurm/[\w-]+\.sh", "run"),
    Rule("sbatch", r"([A-Z_]+=\S+ )*sbatch slurm/[\w-]+\.sh", "parse",
         "Slurm: tests/slurm submits the scripts to a private single-node cluster"),
    Rule("compare-routers", r"python scripts/compare_routers\.py .*", "parse",
         "minutes to hours: tests/unit/test_compare_routers.py runs a short end-to-end comparison"),
    Rule("bench", r"python scripts/bench_(router|moe_layer)\.py( .*)?", "run"),
    Rule("bench-e2e", r"python scripts/bench_e2e\.py( .*)?", "parse",
         "trains two GPTs: tests/unit/test_bench_e2e.py runs it for 2 steps on CPU"),
    Rule("gpu-checks", r"bash scripts/gpu_checks\.sh( .*)?", "parse",
         "GPU only: a device run; here bash checks its syntax"),
    Rule("convert", r"python (-m megatron_dirmoe\.convert|scripts/convert_to_hf\.py) "
                    r"(to-hf|to-megatron) .*", "run"),
    Rule("preprocess", r"(dirmoe-preprocess|python scripts/preprocess_data\.py|"
                       r"python -m megatron_dirmoe\.data\.preprocess)( .*)?", "run"),
    Rule("example", r"(python|bash) examples/[\w-]+\.(py|sh)( .*)?", "run"),
    Rule("tensorboard", r"tensorboard --logdir \S+", "run"),
)

COMMANDS = readme_commands(README.read_text())


def rules_for(command: str) -> list[Rule]:
    return [rule for rule in RULES if re.fullmatch(rule.pattern, command)]


def test_readme_commands_are_found():
    """The extraction itself: the README's first command and a few others are there."""
    assert COMMANDS[:2] == ["bash scripts/setup_venv.sh", "dirmoe-pretrain --preset tiny"]
    assert "DRY_RUN=1 bash slurm/small.sh" in COMMANDS
    assert any(c.startswith("torchrun --nproc-per-node 8 -m megatron_dirmoe.pretrain")
               for c in COMMANDS)


def test_every_readme_command_has_a_rule():
    problems = [f"{c!r} matches {[r.name for r in rules_for(c)] or 'no rule'}"
                for c in COMMANDS if len(rules_for(c)) != 1]
    assert not problems, ("README commands need exactly one rule in tests/unit/test_readme.py "
                          "(and a test where it needs one):\n" + "\n".join(problems))


def test_readme_python_imports_resolve():
    """The import lines of the README's Python snippets work as written."""
    for match in _FENCE.finditer(README.read_text()):
        if match.group(1) == "python":
            for node in ast.parse(match.group(2).replace("...", "pass")).body:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    exec(compile(ast.Module([node], []), "README.md", "exec"), {})


# ---- checks per rule ---------------------------------------------------------------------------


def _placeholders(argv: list[str], **values: str) -> list[str]:
    """`<name>` tokens replaced by values[name] (or a dummy path)."""
    return [values.get(a[1:-1], f"/nonexistent/{a[1:-1]}") if re.fullmatch(r"<[^<>]+>", a) else a
            for a in argv]


def _env_and_argv(argv: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while argv and re.match(r"^[A-Z][A-Z0-9_]*=", argv[0]):
        key, value = argv[0].split("=", 1)
        env[key] = value
        argv = argv[1:]
    return env, argv


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(argv, tmp_path, env=None, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=REPO, env=dict(user_env(), **(env or {})),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def check_ci(command: str, argv: list[str], tmp_path) -> None:
    ci = (REPO / ".ci" / "run").read_text()
    env, argv = _env_and_argv(argv)
    script = REPO / argv[1] if argv[0] == "bash" else None
    if script is not None:
        subprocess.run(["bash", "-n", str(script)], check=True)
    if command.endswith("setup_venv.sh dev") or command.endswith("setup_venv.sh"):
        assert "bash scripts/setup_venv.sh dev" in ci
        if argv[-1] == "dev":
            extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
            assert "dev" in extras["optional-dependencies"]
    if command == "python -m pytest -q":
        assert ".venv/bin/python -m pytest -q" in ci
    for key in env:  # the switch the README mentions is read by the script
        assert key in script.read_text() + ci, key
    if argv[:2] == ["pip", "install"]:
        target = argv[-1]
        if extra := re.fullmatch(r"\.\[(\w+)\]", target.removeprefix("-e").strip()):
            extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
            assert extra.group(1) in extras["optional-dependencies"], target
        else:  # an optional package: the code that needs it says how to install it
            sources = "".join(p.read_text() for p in (REPO / "megatron_dirmoe").rglob("*.py"))
            assert f"pip install {target}" in sources, target


def check_install_plan(argv, tmp_path) -> None:
    """On this machine: no driver, so the lock's torch (empty output); or the pins."""
    done = _run([sys.executable, *argv[1:]], tmp_path)
    if argv[2] == "torch-index":
        assert done.stdout.strip() in ("", *(
            f"https://download.pytorch.org/whl/cu{a}{b}" for a, b in
            _load_script(REPO / "scripts" / "install_plan.py").TORCH_CUDA_BUILDS))
    else:
        assert re.search(r"^torch==", done.stdout, re.M)


def check_freeze_constraints(argv, tmp_path) -> None:
    """In a scratch copy (the real constraints.txt is untouched), against this interpreter."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "freeze_constraints.sh").write_text(
        (REPO / "scripts" / "freeze_constraints.sh").read_text())
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    done = subprocess.run(["bash", "scripts/freeze_constraints.sh"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=120, check=True)
    assert done.stdout.startswith("wrote constraints.txt")
    lines = (tmp_path / "constraints.txt").read_text().splitlines()
    pins = {line.split("==")[0].lower() for line in lines if "==" in line}
    assert {"megatron-core", "torch", "tensorboard"} <= pins
    assert not any("dirmoe" in line for line in lines if not line.startswith("#"))


def check_pretrain_cpu(argv, tmp_path, request) -> None:
    """Run it with the tiny overrides; `dirmoe-pretrain --preset tiny` (with or without flags
    that the overrides set anyway) is the shared tiny_preset_run."""
    args = argv[3:] if argv[0] == "python" else argv[1:]
    overridden = {"--train-iters": 1, "--save": 1, "--load": 1, "--tensorboard-dir": 1,
                  "--moe-per-layer-logging": 0, "--eval-interval": 1, "--eval-iters": 1,
                  "--log-interval": 1}
    rest, i = [], 0
    while i < len(args):
        if args[i] in overridden:
            i += 1 + overridden[args[i]]
        else:
            rest.append(args[i])
            i += 1
    if rest == ["--preset", "tiny"]:
        run = request.getfixturevalue("tiny_preset_run")
    else:
        run = run_pretrain(args, tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "final validation loss" in run.stdout and "saved checkpoint" in run.stdout


def check_pretrain_gpu(argv, tmp_path, monkeypatch) -> None:
    """torchrun's own parser, then the entry point's (Megatron's parser plus --dirmoe-*)."""
    from torch.distributed.run import get_args_parser

    from megatron_dirmoe.training.arguments import parse_pretrain_args

    monkeypatch.chdir(tmp_path)  # relative --save (the embedded corpus is cached under it)
    argv = _placeholders(argv)
    launch = get_args_parser().parse_args(argv[1:])
    assert launch.module and launch.training_script == "megatron_dirmoe.pretrain"
    args = parse_pretrain_args(launch.training_script_args, validate=False)
    assert args.train_iters > 0


def check_slurm_dry_run(argv, tmp_path) -> None:
    env, argv = _env_and_argv(argv)
    done = _run(argv, tmp_path, dict(env, PYTHON=sys.executable, RUN_ROOT=str(tmp_path)))
    assert "launch: srun" in done.stdout and "DRY_RUN=1: not launching" in done.stdout


def check_sbatch(argv, tmp_path) -> None:
    env, argv = _env_and_argv(argv)
    script = argv[-1]
    done = _run(["bash", script], tmp_path,
                dict(env, DRY_RUN="1", PYTHON=sys.executable, RUN_ROOT=str(tmp_path)))
    assert "launch: srun" in done.stdout


def check_compare_routers(argv, tmp_path) -> None:
    compare = _load_script(REPO / "scripts" / "compare_routers.py")
    opts = compare.build_parser().parse_args(argv[2:])
    assert opts.preset in compare.PRESETS
    assert set(opts.routers or ()) <= set(compare.routers("0")), opts.routers


def check_bench(argv, tmp_path, monkeypatch, capsys) -> None:
    """In this process at a toy size on CPU (the flags after the README's win)."""
    script = REPO / argv[1]
    tiny = ["--device", "cpu", "--tokens", "128", "--hidden", "32", "--iters", "1",
            "--warmup", "0"]
    if "moe_layer" in script.name:
        tiny += ["--ffn-hidden", "32"]
    else:
        tiny += ["--experts", "8"]
    bench = _load_script(script)
    monkeypatch.setattr(sys, "argv", [str(script), *argv[2:], *tiny])
    bench.main()
    assert "fwd+bwd ms" in capsys.readouterr().out


def check_bench_e2e(argv, tmp_path) -> None:
    bench = _load_script(REPO / "scripts" / "bench_e2e.py")
    opts = bench.parse_args(argv[2:])
    assert opts.size in bench.SIZES


def check_gpu_checks(argv, tmp_path) -> None:
    subprocess.run(["bash", "-n", str(REPO / argv[1])], check=True)


def check_convert(argv, tmp_path, request, monkeypatch) -> None:
    """`to-hf` on the tiny preset run's checkpoint (`<save dir>`), `to-megatron` back from it."""
    from megatron_dirmoe.convert.__main__ import build_parser, main

    run = request.getfixturevalue("tiny_preset_run")
    args = argv[3:] if argv[1] == "-m" else argv[2:]
    args = _placeholders(args, save_dir=str(run.checkpoint_dir))
    parsed = build_parser().parse_args(args)
    monkeypatch.chdir(tmp_path)  # relative output folders land here
    if parsed.command == "to-megatron":
        main(["to-hf", "--load", str(run.checkpoint_dir), "--out", parsed.hf])
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    out = Path(parsed.out if parsed.command == "to-hf" else parsed.save)
    assert out.is_dir() and any(out.iterdir())


def check_preprocess(argv, tmp_path) -> None:
    """On a small JSONL in place of the README's input."""
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(f'{{"text": "Document {i}. Some words, then more."}}\n'
                           for i in range(20)))
    args = _placeholders(argv, input=str(inp), prefix=str(tmp_path / "out"))
    done = _run(args, tmp_path)
    assert "train with: --data-path" in done.stdout or "wrote" in done.stdout


def check_example(argv, tmp_path) -> None:
    """The file exists and a test under tests/ runs it; flags parse with its own parser."""
    path = REPO / argv[1]
    assert path.is_file(), path
    tests = [p for p in (REPO / "tests").rglob("test_*.py") if path.stem in p.read_text()]
    assert tests, f"no test under tests/ runs {path.name}"
    if path.suffix == ".sh":
        subprocess.run(["bash", "-n", str(path)], check=True)
        return
    module = _load_script(path)
    if hasattr(module, "build_parser"):
        module.build_parser().parse_args(argv[2:])


def check_tensorboard(argv, tmp_path, request) -> None:
    """`tensorboard --logdir <run>/tb` serves what the tiny preset run wrote (`--inspect`
    lists it without starting the server)."""
    run = request.getfixturevalue("tiny_preset_run")
    done = _run([str(BIN / "tensorboard"), "--inspect", "--logdir", str(run.tensorboard_dir)],
                tmp_path)
    assert "dirmoe/active_experts" in done.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=[c[:60] for c in COMMANDS])
def test_readme_command(command, tmp_path, request, monkeypatch, capsys):
    (rule,) = rules_for(command) or pytest.fail(f"no rule for README command {command!r}")
    argv = shlex.split(command)
    if rule.how == "ci":
        return check_ci(command, argv, tmp_path)
    check = globals()["check_" + rule.name.replace("-", "_")]
    kwargs = {name: value for name, value in dict(
        request=request, monkeypatch=monkeypatch, capsys=capsys).items()
        if name in check.__code__.co_varnames}
    check(argv, tmp_path, **kwargs)


def test_a_wrong_flag_or_an_unknown_command_fails(tmp_path, monkeypatch):
    """What this file exists for: a misspelt flag in a command that cannot run here still fails,
    and a command no rule covers is reported."""
    bad = shlex.split("torchrun --nproc-per-node 8 -m megatron_dirmoe.pretrain --num-layer 2 "
                      "--train-iters 10")
    with pytest.raises(SystemExit):
        check_pretrain_gpu(bad, tmp_path, monkeypatch)
    with pytest.raises(SystemExit):
        check_compare_routers(shlex.split("python scripts/compare_routers.py --preset nope"),
                              tmp_path)
    assert rules_for("python scripts/new_tool.py --flag") == []
    assert readme_commands("x\n```bash\nA=1 bash run.sh \\\n  --x 1   # note\n```\n"
                           "and `python tool.py --y` but not `dirmoe-pretrain`.\n") == [
        "A=1 bash run.sh --x 1", "python tool.py --y"]
