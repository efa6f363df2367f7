"""The shipped sbatch scripts without a cluster: dry runs, layout refusals, shellcheck, and the
entry point's parser (plus Megatron's validate_args) on each script's exact launch line.

The layout arithmetic is recomputed here from the printed srun line, independently of
`megatron_dirmoe.launch`, so a bug there cannot hide behind itself.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from slurm_paths import REPO, SCRIPTS, SLURM_DIR

PAPER = {  # the paper's optimisation recipe, as the scripts must pass it
    "--global-batch-size": "512", "--micro-batch-size": "32", "--lr": "1e-4", "--min-lr": "1e-5",
    "--weight-decay": "1e-2", "--lr-warmup-fraction": "0.01", "--lr-decay-style": "cosine",
    "--clip-grad": "1.0", "--seed": "1234", "--num-experts": "8",
}


# The interpreter this venv was made from: no megatron-core, like the bare python3 on the batch
# host of a container job. Its launch check applies the layout rules only (a second, not the
# entry point's full parse), which keeps these script-plumbing tests fast;
# test_dry_run_applies_the_entry_points_checks covers the full check.
BARE_PYTHON = getattr(sys, "_base_executable", sys.executable)


def _env(tmp_path, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(DRY_RUN="1", PYTHON=sys.executable, CHECK_PYTHON=BARE_PYTHON,
               RUN_ROOT=str(tmp_path / "runs"))
    env.update(overrides)
    return env


def dry_run(script: str, tmp_path, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM_DIR / script)], env=_env(tmp_path, **overrides), cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )


def header(script: str, name: str) -> str:
    match = re.search(rf"^#SBATCH --{name}=(\S+)", (SLURM_DIR / script).read_text(), re.M)
    assert match, f"{script} has no #SBATCH --{name}"
    return match.group(1)


def launch_line(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("launch: ")]
    assert len(lines) == 1, stdout
    return shlex.split(lines[0][len("launch: "):])


def split_launch(argv: list[str]) -> tuple[dict, list[str]]:
    """(srun --key=value options, pretrain arguments) of a printed launch line."""
    assert argv[0] == "srun"
    srun = dict(a[2:].split("=", 1) for a in argv[1:argv.index("bash")] if "=" in a)
    return srun, argv[argv.index("megatron_dirmoe.pretrain") + 1:]


def flags(args: list[str]) -> dict:
    out, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            out[args[i]] = True
            i += 1
    return out


def test_shipped_scripts():
    assert SCRIPTS == ["large.sh", "medium.sh", "small.sh", "small_k2.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_launch_line_is_consistent(script, tmp_path):
    res = dry_run(script, tmp_path)
    assert res.returncode == 0, res.stderr
    srun, args = split_launch(launch_line(res.stdout))
    f = flags(args)

    nodes, per_node = int(srun["nodes"]), int(srun["ntasks-per-node"])
    assert nodes == int(header(script, "nodes"))
    assert per_node == int(header(script, "gpus-per-node")) == int(header(script, "ntasks-per-node"))
    world = nodes * per_node
    tp, pp = int(f["--tensor-model-parallel-size"]), int(f["--pipeline-model-parallel-size"])
    cp, ep = int(f["--context-parallel-size"]), int(f["--expert-model-parallel-size"])
    etp = int(f["--expert-tensor-parallel-size"])
    experts, layers = int(f["--num-experts"]), int(f["--num-layers"])
    gbs, mbs = int(f["--global-batch-size"]), int(f["--micro-batch-size"])

    assert world % (tp * pp * cp) == 0
    dp = world // (tp * pp * cp)
    assert experts % ep == 0
    assert world % (etp * ep * pp) == 0  # Megatron's expert grid: ETP x EP x EDP x PP
    assert gbs % (mbs * dp) == 0
    assert layers % pp == 0
    assert int(f["--num-attention-heads"]) % tp == 0
    assert ("--sequence-parallel" in f) == (tp > 1)
    # The check printed the same numbers.
    assert f"world {world} = TP {tp} x PP {pp} x CP {cp} x DP {dp}" in res.stdout
    assert f"x {gbs // (mbs * dp)} micro-batches/step" in res.stdout

    for flag, value in PAPER.items():
        assert f[flag] == value, flag
    assert f["--dirmoe-target-k"] == ("2" if script == "small_k2.sh" else "1")
    assert "--bf16" in f and "--exit-signal-handler" in f
    assert f["--save"] == f["--load"]
    assert f["--save"].startswith(str(tmp_path / "runs"))


def test_small_is_about_one_billion_parameters(tmp_path):
    from megatron_dirmoe.launch import check_layout, parameter_counts, resolve_args

    _, args = split_launch(launch_line(dry_run("small.sh", tmp_path).stdout))
    total, active, _ = parameter_counts(resolve_args(args))
    assert 0.85e9 < total < 1.1e9
    assert active < total / 3
    assert check_layout(resolve_args(args), 8).num_microbatches == 2


@pytest.mark.parametrize(
    "script, overrides, message",
    [
        ("small.sh", dict(EP="3"), "--num-experts 8 is not divisible by --expert-model-parallel-size 3"),
        ("small.sh", dict(TP="3", NUM_ATTENTION_HEADS="24"), "world size 8 is not divisible by --tensor"),
        ("small.sh", dict(GLOBAL_BATCH_SIZE="500"), "--global-batch-size 500 is not divisible"),
        ("small.sh", dict(GPUS_PER_NODE="6"), "expert-model-parallel-size x --pipeline"),
        ("medium.sh", dict(NNODES="3", TP="2", EP="8"), "--global-batch-size 512 is not divisible"),
        ("large.sh", dict(NUM_LAYERS="31"), "--num-layers 31 is not divisible"),
    ],
)
def test_dry_run_refuses_impossible_layouts(script, overrides, message, tmp_path):
    res = dry_run(script, tmp_path, **overrides)
    assert res.returncode == 2
    assert message in res.stderr
    assert "nothing was launched" in res.stderr
    assert "launch:" not in res.stdout


def test_dry_run_applies_the_entry_points_checks(tmp_path):
    """With the training environment's python (the default CHECK_PYTHON outside containers)
    the dry run is the job's own start-up check: a Megatron flag the entry point refuses stops
    it before srun. A python without megatron-core checks the layout only, and says so."""
    full = dry_run("small.sh", tmp_path, CHECK_PYTHON=sys.executable,
                   EXTRA_ARGS="--moe-router-score-function sigmoid")
    assert full.returncode == 2, full.stdout
    assert "--moe-router-score-function sigmoid" in full.stderr
    assert "not supported by the DirMoE entry point" in full.stderr
    assert "nothing was launched" in full.stderr
    ok = dry_run("small.sh", tmp_path, CHECK_PYTHON=sys.executable)
    assert ok.returncode == 0, ok.stderr
    bare = dry_run("small.sh", tmp_path, EXTRA_ARGS="--moe-router-score-function sigmoid")
    if "megatron-core is not importable" in bare.stderr:
        assert bare.returncode == 0 and "checked the layout rules only" in bare.stderr


def test_not_inside_slurm_without_dry_run(tmp_path):
    res = dry_run("small.sh", tmp_path, DRY_RUN="0")
    assert res.returncode == 2 and "not inside a Slurm allocation" in res.stderr


def test_cpu_mode_runs_one_process(tmp_path):
    res = dry_run("small.sh", tmp_path, DEVICE="cpu", PRESET="tiny", TRAIN_ITERS="7")
    assert res.returncode == 0, res.stderr
    srun, args = split_launch(launch_line(res.stdout))
    assert srun == {"nodes": "1", "ntasks": "1"}
    f = flags(args)
    assert f["--preset"] == "tiny" and f["--dirmoe-device"] == "cpu" and f["--train-iters"] == "7"
    assert "--bf16" not in f and "--num-layers" not in f  # the preset decides the model


def test_container_option_adds_pyxis_flags(tmp_path):
    res = dry_run("medium.sh", tmp_path, CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.10-py3",
                  CONTAINER_MOUNTS="/data:/data:ro")
    assert res.returncode == 0, res.stderr
    srun, _ = split_launch(launch_line(res.stdout))
    run_dir = tmp_path / "runs" / "dirmoe-medium-k1"
    assert srun["container-image"] == "nvcr.io#nvidia/pytorch:25.10-py3"
    assert srun["container-mounts"] == f"{REPO},{run_dir},/data:/data:ro"
    assert srun["container-workdir"] == str(REPO)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed "
                    "(apt-get install shellcheck; .ci/slurm_setup.sh does)")
def test_shellcheck_clean():
    res = subprocess.run(["shellcheck", "-x", *(f"slurm/{p}" for p in [*SCRIPTS, "common.sh"])],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_starts_with_strict_mode(script):
    text = (SLURM_DIR / script).read_text()
    assert "\nset -euo pipefail\n" in text
    assert "/home/" not in text and "/work/" not in text  # no user paths


def test_entry_point_accepts_every_launch_line(tmp_path, monkeypatch):
    """Each script's exact arguments through the entry point's parser and Megatron's own
    `validate_args`, at the script's world size (CUDA capability faked as an H100's)."""
    torch = pytest.importorskip("torch")
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    import megatron.training.arguments as megatron_arguments

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)
    for script in SCRIPTS:
        res = dry_run(script, tmp_path, DATA_PATH="1.0 /nonexistent/corpus_text_document",
                      TOKENIZER_TYPE="NullTokenizer")
        srun, args = split_launch(launch_line(res.stdout))
        world = int(srun["nodes"]) * int(srun["ntasks-per-node"])
        env_line = next(x for x in res.stdout.splitlines() if x.startswith("[dirmoe-slurm] env: "))
        for item in env_line.split("env: ", 1)[1].split():  # what every rank inherits
            monkeypatch.setenv(*item.split("=", 1))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        parsed = parse_pretrain_args(args + ["--vocab-size", "32000"], validate=True,
                                     this_machine=False)  # checked for the GPU nodes
        f = flags(args)
        tp, pp = int(f["--tensor-model-parallel-size"]), int(f["--pipeline-model-parallel-size"])
        assert parsed.data_parallel_size == world // (tp * pp), script
        assert parsed.global_batch_size == 512 and parsed.micro_batch_size == 32
        assert parsed.moe_router_topk == min(8, 4 * int(f["--dirmoe-target-k"]))
        assert parsed.bf16 and parsed.use_distributed_optimizer
