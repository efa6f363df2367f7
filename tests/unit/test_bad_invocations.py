"""Bad input on the training path: every row of :data:`ROWS` is a `dirmoe-pretrain` invocation a
user gets wrong (flags, data and tokenizer paths, checkpoint directories, data files, layouts).
Each must end with exit status 2, one message that names the flag or file, and no traceback.

The rows run through the console entry (`megatron_dirmoe.pretrain.cli`) in this process, so they
cost the start-up checks only; `test_console_script_rows` runs three of them as real
`dirmoe-pretrain` processes. One trained checkpoint (2 iterations, saved at both) is shared by
the checkpoint rows, each damaging its own copy. Also here: the user-error rules themselves
(`megatron_dirmoe.errors`), the preset directory per model shape, and `kill -9` during a save.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
from user_runs import BIN, user_env

TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "128", "--num-experts", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
    "--dirmoe-device", "cpu", "--dirmoe-target-k", "1",
    "--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1",
    "--save-interval", "2",
]
ERROR_LINE = re.compile(r"^dirmoe-pretrain: error: ", re.M)


@dataclass
class Env:
    tmp: Path  # this row's own folder
    cache: Path  # the embedded corpus, tokenised once for the module
    ckpt: Path  # this row's copy of the trained run (iterations 1 and 2)
    tokenizer: str  # the shipped SentencePiece model

    @property
    def prefix(self) -> str:  # a real indexed dataset, written by the entry point
        return str(self.cache / "shakespeare_train_text_document")

    def copy_prefix(self, name: str) -> str:
        for ext in (".bin", ".idx"):
            shutil.copy(self.prefix + ext, self.tmp / f"{name}{ext}")
        return str(self.tmp / name)

    def spm(self, *argv: str) -> list[str]:
        return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                self.tokenizer, *argv]

    def file(self, name: str, text: str = "x\n") -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)


@dataclass
class Row:
    id: str
    argv: Callable[[Env], list[str]]
    # Substrings of the message ({ckpt}, {tmp}, {prefix} filled in): the flag or file first.
    expect: tuple[str, ...]
    setup: Optional[Callable[[Env], None]] = None
    checkpoint: bool = False  # resume from the env's trained copy (--save/--load it)
    extra: dict = field(default_factory=dict)


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _cut(env: Env, name: str, ext: str, size: int) -> str:
    prefix = env.copy_prefix(name)
    _truncate(Path(prefix + ext), size)
    return prefix


ROWS = [
    # ---- flags
    Row("flag-not-an-int", lambda e: ["--hidden-size", "abc"], ("--hidden-size", "'abc'")),
    Row("flag-misspelt", lambda e: ["--num-expert", "6"], ("--num-expert", "did you mean "
                                                            "--num-experts?")),
    Row("dirmoe-flag-out-of-range", lambda e: ["--dirmoe-target-k", "0"], ("--dirmoe-target-k",)),
    Row("dirmoe-k-above-experts", lambda e: ["--dirmoe-target-k", "9"], ("--dirmoe-target-k",)),
    Row("megatron-bare-assert", lambda e: ["--num-attention-heads", "3"],
        ("--hidden-size 64", "--num-attention-heads 3",
         "args.hidden_size % args.num_attention_heads == 0")),
    Row("megatron-check-message", lambda e: ["--seq-length", "128"],
        ("--max-position-embeddings 64", "--seq-length 128")),
    Row("megatron-save-interval-zero", lambda e: ["--save-interval", "0"],
        ("--save-interval 0", "args.save_interval > 0")),
    Row("batch-not-divisible", lambda e: ["--global-batch-size", "6"],
        ("--global-batch-size 6", "--micro-batch-size")),
    # ---- layouts: the CPU trial checks them as for the world size they imply
    Row("cpu-trial-ep-layout", lambda e: ["--num-experts", "6", "--expert-model-parallel-size", "4"],
        ("--num-experts 6", "--expert-model-parallel-size 4", "as for 4 ranks")),
    Row("cpu-trial-tp-without-sp", lambda e: ["--tensor-model-parallel-size", "2"],
        ("--tensor-model-parallel-size 2", "--sequence-parallel", "as for 2 ranks")),
    Row("cpu-trial-pp-layers", lambda e: ["--pipeline-model-parallel-size", "3"],
        ("--num-layers 2", "--pipeline-model-parallel-size 3")),
    Row("cpu-trial-dispatcher", lambda e: ["--moe-token-dispatcher-type", "flex"],
        ("--moe-token-dispatcher-type 'flex'",)),
    # ---- data and tokenizer paths
    Row("data-path-missing-no-tokenizer", lambda e: ["--data-path", "/nonexistent/prefix"],
        ("--data-path /nonexistent/prefix", "/nonexistent/prefix.bin", "--tokenizer-type")),
    Row("data-path-without-tokenizer", lambda e: ["--data-path", e.prefix],
        ("--tokenizer-type is not set", "--data-path")),
    Row("tokenizer-model-missing", lambda e: ["--tokenizer-type", "SentencePieceTokenizer",
                                              "--tokenizer-model", "/nonexistent.model"],
        ("--tokenizer-model /nonexistent.model", "no such file")),
    Row("tokenizer-type-without-model",
        lambda e: ["--data-path", e.prefix, "--tokenizer-type", "SentencePieceTokenizer"],
        ("--tokenizer-type SentencePieceTokenizer needs --tokenizer-model",)),
    Row("tokenizer-model-not-a-model",
        lambda e: ["--data-path", e.prefix, "--tokenizer-type", "SentencePieceTokenizer",
                   "--tokenizer-model", e.file("vocab.model", "not a sentencepiece model\n")],
        ("--tokenizer-model {tmp}/vocab.model", "Megatron cannot load this tokenizer")),
    Row("mock-data-without-tokenizer", lambda e: ["--mock-data"],
        ("--mock-data", "--tokenizer-type NullTokenizer --vocab-size")),
    Row("data-path-with-suffix", lambda e: e.spm("--data-path", e.prefix + ".bin"),
        ("--data-path {prefix}.bin", "drop the suffix: --data-path {prefix}")),
    Row("data-path-misspelt", lambda e: e.spm("--data-path", e.prefix[:-3] + "xnt"),
        ("neither", "did you mean --data-path {prefix}?")),
    Row("data-args-path-missing", lambda e: e.spm("--data-args-path", str(e.tmp / "blend.txt")),
        ("--data-args-path {tmp}/blend.txt", "no such file")),
    # ---- data files
    Row("data-idx-missing", lambda e: e.spm("--data-path", e.copy_prefix("d")),
        ("--data-path {tmp}/d", "{tmp}/d.idx is missing"), extra={"remove": "d.idx"}),
    Row("data-idx-truncated", lambda e: e.spm("--data-path", _cut(e, "d", ".idx", 100)),
        ("{tmp}/d.idx is 100 bytes", "truncated")),
    Row("data-bin-truncated", lambda e: e.spm("--data-path", _cut(e, "d", ".bin", 1000)),
        ("{tmp}/d.bin is 1,000 bytes", "truncated")),
    Row("data-idx-foreign", lambda e: e.spm("--data-path", e.copy_prefix("d")),
        ("{tmp}/d.idx is not a Megatron indexed-dataset index",),
        extra={"overwrite": ("d.idx", b"PK\x03\x04" + bytes(60))}),
    # ---- checkpoint directories
    Row("resume-other-hidden-size", lambda e: ["--hidden-size", "128"],
        ("--load {ckpt} holds another model", "--hidden-size: saved 64, given 128"),
        checkpoint=True),
    Row("resume-other-num-experts", lambda e: ["--num-experts", "8"],
        ("--num-experts: saved 4, given 8", "--save DIR --load DIR"), checkpoint=True),
    Row("resume-other-router-settings", lambda e: ["--dirmoe-count-weight", "0.3"],
        ("--dirmoe-count-weight 0.1 -> 0.3", "--dirmoe-allow-config-change"), checkpoint=True),
    Row("resume-controller-without-state",  # the k = 1 run has no load controller's b
        lambda e: ["--dirmoe-load-control-rate", "0.03", "--dirmoe-allow-config-change"],
        ("--load {ckpt}: the checkpoint was trained without load_bias",
         "resume with --dirmoe-load-control-rate 0"), checkpoint=True),
    Row("checkpoint-shard-truncated", lambda e: [],
        ("{ckpt}/iter_0000002/__0_0.distcp is", "(truncated)",
         "newest intact earlier checkpoint is {ckpt}/iter_0000001", "--ckpt-step 1"),
        setup=lambda e: _truncate(e.ckpt / "iter_0000002" / "__0_0.distcp", 4096),
        checkpoint=True),
    Row("checkpoint-shard-deleted", lambda e: [],
        ("{ckpt}/iter_0000002/__0_0.distcp is missing", "--ckpt-step 1"),
        setup=lambda e: (e.ckpt / "iter_0000002" / "__0_0.distcp").unlink(), checkpoint=True),
    Row("checkpoint-metadata-deleted", lambda e: [],
        ("{ckpt}/iter_0000002/.metadata is missing", "--ckpt-step 1"),
        setup=lambda e: (e.ckpt / "iter_0000002" / ".metadata").unlink(), checkpoint=True),
    Row("checkpoint-metadata-garbled", lambda e: [],
        ("{ckpt}/iter_0000002/.metadata cannot be read", "--ckpt-step 1"),
        setup=lambda e: (e.ckpt / "iter_0000002" / ".metadata").write_bytes(b"\x80\x04garbage"),
        checkpoint=True),
    Row("checkpoint-dir-missing", lambda e: [],
        ("{ckpt}/iter_0000002 is missing", "latest_checkpointed_iteration.txt", "--ckpt-step 1"),
        setup=lambda e: shutil.rmtree(e.ckpt / "iter_0000002"), checkpoint=True),
    Row("checkpoint-tracker-garbled", lambda e: [],
        ("{ckpt}/latest_checkpointed_iteration.txt", "found 'iter 2'"),
        setup=lambda e: (e.ckpt / "latest_checkpointed_iteration.txt").write_text("iter 2\n"),
        checkpoint=True),
    Row("checkpoint-tracker-missing", lambda e: [],
        ("--load {ckpt} holds checkpoints (iterations 1, 2)", "--ckpt-step 2"),
        setup=lambda e: (e.ckpt / "latest_checkpointed_iteration.txt").unlink(),
        checkpoint=True),
    Row("ckpt-step-not-saved", lambda e: ["--ckpt-step", "7"],
        ("--ckpt-step 7", "iterations saved there: 1, 2"), checkpoint=True),
    Row("load-names-one-checkpoint", lambda e: ["--load", str(e.ckpt / "iter_0000002")],
        ("--load {ckpt}/iter_0000002 is one checkpoint's own directory",
         "--load {ckpt} --ckpt-step 2"), checkpoint=True),
    Row("load-is-a-file", lambda e: ["--load", e.file("ckpt.pt")],
        ("--load {tmp}/ckpt.pt is a file",)),
    # ---- output paths
    Row("save-under-a-file", lambda e: ["--save", e.file("out") + "/run"],
        ("--save {tmp}/out/run cannot be created", "is a file")),
    Row("tensorboard-under-a-file", lambda e: ["--tensorboard-dir", e.file("tb") + "/logs"],
        ("--tensorboard-dir {tmp}/tb/logs cannot be created",)),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded corpus tokenised once and a 2-iteration run saved at both iterations."""
    from megatron_dirmoe.pretrain import main

    root = tmp_path_factory.mktemp("bad_invocations")
    cache, ckpt = root / "data", root / "ckpt"
    result = main([*TINY, "--save-interval", "1", "--save", str(ckpt), "--load", str(ckpt),
                   "--dirmoe-data-cache", str(cache)])
    assert result.iteration == 2 and (ckpt / "iter_0000001").is_dir()
    return cache, ckpt


def invoke(argv: list[str], capsys) -> tuple[int, str, str]:
    """The console entry in this process: (exit status, stdout, stderr)."""
    from megatron_dirmoe.pretrain import cli

    try:
        code = cli(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside the parser
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def make_env(row: Row, tmp_path: Path, trained) -> tuple[Env, list[str]]:
    from megatron_dirmoe.data import default_tokenizer_model

    cache, ckpt = trained
    env = Env(tmp=tmp_path, cache=cache, ckpt=tmp_path / "ckpt",
              tokenizer=str(default_tokenizer_model()))
    run_dir = env.ckpt if row.checkpoint else tmp_path / "run"
    if row.checkpoint:
        shutil.copytree(ckpt, env.ckpt)
    argv = [*TINY, "--dirmoe-data-cache", str(cache), "--save", str(run_dir), "--load",
            str(run_dir), *row.argv(env)]
    if row.setup:
        row.setup(env)
    if "remove" in row.extra:
        (tmp_path / row.extra["remove"]).unlink()
    if "overwrite" in row.extra:
        name, data = row.extra["overwrite"]
        (tmp_path / name).write_bytes(data)
    return env, argv


def expected(row: Row, env: Env) -> list[str]:
    return [text.format(ckpt=env.ckpt, tmp=env.tmp, prefix=env.prefix) for text in row.expect]


def test_table_has_at_least_twenty_rows_of_every_kind():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 20
    kinds = {i.split("-")[0] for i in ids}
    assert {"flag", "cpu", "data", "tokenizer", "checkpoint", "resume", "save"} <= kinds


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_bad_invocation(row, tmp_path, trained, capsys):
    env, argv = make_env(row, tmp_path, trained)
    code, out, err = invoke(argv, capsys)
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err + out, err[-3000:]
    assert len(ERROR_LINE.findall(err)) == 1, err  # one message
    for text in expected(row, env):
        assert text in err, (text, err)
    # Nothing trained, nothing written: a checkpoint row's directory holds what it held.
    assert not re.search(r"iteration\s+\d+/2 \|", out), out[-2000:]
    if row.checkpoint:
        assert {p.name for p in env.ckpt.iterdir()} <= {"iter_0000001", "iter_0000002",
                                                        "latest_checkpointed_iteration.txt"}


def test_the_fix_of_a_damaged_checkpoint_works(tmp_path, trained, capsys):
    """The flag the damage report names (--ckpt-step 1) resumes from the intact checkpoint and
    trains again the iteration whose checkpoint was damaged, saving it anew."""
    from megatron_dirmoe.training.resume import checkpoint_problems

    row = next(r for r in ROWS if r.id == "checkpoint-shard-truncated")
    env, argv = make_env(row, tmp_path, trained)
    assert invoke(argv, capsys)[0] == 2
    code, out, err = invoke([*argv, "--ckpt-step", "1"], capsys)
    assert code == 0, err[-3000:]
    assert f"resumed from {env.ckpt} at iteration 1" in out
    assert "iteration      2/2" in out
    assert checkpoint_problems(env.ckpt / "iter_0000002") == []
    assert (env.ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_console_script_rows(tmp_path, trained):
    """Three rows as the user runs them: the `dirmoe-pretrain` console script, a fresh process,
    stderr exactly one message and no traceback (also none from objects a failed start-up left
    half built)."""
    exe = BIN / "dirmoe-pretrain"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "megatron_dirmoe.pretrain"]
    for row_id in ("data-path-missing-no-tokenizer", "data-idx-truncated",
                   "checkpoint-shard-truncated"):
        row = next(r for r in ROWS if r.id == row_id)
        (tmp_path / row_id).mkdir()
        env, argv = make_env(row, tmp_path / row_id, trained)
        done = subprocess.run([*cmd, *argv], env=user_env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, \
            done.stderr[-3000:]
        assert len(ERROR_LINE.findall(done.stderr)) == 1, done.stderr
        for text in expected(row, env):
            assert text in done.stderr, (text, done.stderr)


# ------------------------------------------------------------------ the rules of the error path
def test_user_error_rules():
    from megatron_dirmoe.errors import UserError, as_user_error
    from megatron_dirmoe.layout import LayoutError

    def raised(exc_factory):
        try:
            exc_factory()
        except BaseException as exc:  # noqa: BLE001
            return exc

    assert isinstance(as_user_error(LayoutError("--num-layers 3 ...")), UserError)
    # A ValueError raised by the package's own code that names a flag is a user error ...
    from megatron_dirmoe.layout import moe_layer_numbers

    assert as_user_error(raised(lambda: moe_layer_numbers([1, 0], 3))) is not None
    # ... one without a flag, or raised elsewhere, or of another type, is a bug.
    assert as_user_error(raised(lambda: int("x"))) is None
    assert as_user_error(ValueError("--num-layers bad")) is None  # no traceback in the package
    assert as_user_error(raised(lambda: {}["--num-layers"])) is None
    # SystemExit with a message (argparse-free checks such as the W&B one) reads the same.
    assert str(as_user_error(SystemExit("dirmoe-pretrain: --wandb-project needs wandb"))) == \
        "--wandb-project needs wandb"
    assert as_user_error(SystemExit(0)) is None


def test_debug_shows_the_traceback_and_bugs_keep_theirs(monkeypatch, capsys):
    from megatron_dirmoe.errors import UserError
    from megatron_dirmoe.pretrain import cli

    argv = [*TINY, "--num-experts", "6", "--expert-model-parallel-size", "4"]
    monkeypatch.setenv("DIRMOE_DEBUG", "1")
    with pytest.raises(UserError, match="--expert-model-parallel-size 4"):
        cli(argv)
    monkeypatch.delenv("DIRMOE_DEBUG")

    def bug(args):
        raise KeyError("a bug, not the user's")

    import megatron_dirmoe.training.inputs as inputs

    monkeypatch.setattr(inputs, "check_input_files", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli([*TINY, "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64"])
    assert "error:" not in capsys.readouterr().err


def test_only_a_cut_short_first_save_starts_afresh(tmp_path):
    """No tracker and no intact checkpoint (killed during the first save): a fresh start, not an
    error; an intact one without a tracker is named instead."""
    from megatron_dirmoe.errors import UserError
    from megatron_dirmoe.training.resume import find_checkpoint

    partial = tmp_path / "iter_0000001"
    partial.mkdir()
    (partial / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    assert find_checkpoint(str(tmp_path)) is None
    assert find_checkpoint(str(tmp_path / "not-yet")) is None
    with pytest.raises(UserError, match="--ckpt-step 3 without --load"):
        find_checkpoint(None, 3)


def test_cpu_trial_says_in_one_line_that_it_checked_the_layout(capsys):
    """A valid parallel layout on CPU: checked as for its world size, then one line saying so."""
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    args = parse_pretrain_args([*TINY, "--mock-data", "--expert-model-parallel-size", "2"],
                               validate=False)
    assert args.expert_model_parallel_size == 1  # the CPU loop runs it at one rank
    lines = [line for line in capsys.readouterr().out.splitlines() if "no GPU" in line]
    assert lines == ["[dirmoe] no GPU: parallel flags checked as for 2 ranks (the rules of "
                     "`launch check --world-size 2`), run by the CPU loop at one rank: "
                     "--expert-model-parallel-size 2 -> 1"]


# ------------------------------------------------------------------ presets: a directory per shape
def test_preset_directory_per_model_shape(tmp_path, monkeypatch, trained):
    from megatron_dirmoe.training.arguments import PRESETS, parse_pretrain_args

    monkeypatch.chdir(tmp_path)
    cache = ["--dirmoe-data-cache", str(trained[0]), "--dirmoe-device", "cpu"]
    base = PRESETS["tiny"]["save"]
    args = parse_pretrain_args(["--preset", "tiny", *cache], validate=False)
    assert args.save == args.load == base
    args = parse_pretrain_args(["--preset", "tiny", "--num-experts", "8", *cache], validate=False)
    assert args.save == args.load == base  # the preset's own value: the same model
    args = parse_pretrain_args(["--preset", "tiny", "--num-experts", "6", *cache], validate=False)
    assert args.save == args.load == f"{base}-num-experts-6"
    args = parse_pretrain_args(["--preset", "tiny", "--hidden-size", "256", "--num-experts", "4",
                                *cache], validate=False)
    assert args.save == args.load == f"{base}-hidden-size-256-num-experts-4"
    # Flags that do not change the model keep the preset's directory.
    args = parse_pretrain_args(["--preset", "tiny", "--lr", "1e-3", "--seq-length", "64", *cache],
                               validate=False)
    assert args.save == base
    # --save alone: the run resumes where it saves (the issue's `--num-experts 6 --save elsewhere`).
    args = parse_pretrain_args(["--preset", "tiny", "--num-experts", "6", "--save", "elsewhere",
                                *cache], validate=False)
    assert args.save == args.load == "elsewhere"
    args = parse_pretrain_args(["--preset", "tiny", "--num-experts", "6", "--load", "old",
                                *cache], validate=False)
    assert (args.save, args.load) == (f"{base}-num-experts-6", "old")


def test_preset_with_other_experts_trains_instead_of_hitting_a_shape_error(tmp_path, monkeypatch,
                                                                           trained, capsys):
    """The issue's row: the tiny preset trained once, then `--num-experts` changed on it."""
    from megatron_dirmoe.training.arguments import PRESETS

    monkeypatch.chdir(tmp_path)
    short = ["--train-iters", "1", "--eval-iters", "0", "--dirmoe-data-cache", str(trained[0]),
             "--dirmoe-device", "cpu"]
    code, out, err = invoke(["--preset", "tiny", *short], capsys)
    assert code == 0, err[-3000:]
    code, out, err = invoke(["--preset", "tiny", "--num-experts", "4", *short], capsys)
    assert code == 0, err[-3000:]
    assert "resumed" not in out
    base = tmp_path / PRESETS["tiny"]["save"]
    assert (base / "iter_0000001").is_dir()
    assert (Path(f"{base}-num-experts-4") / "iter_0000001").is_dir()


# ------------------------------------------------------------------ kill -9 during a save
def test_kill_during_save_resumes_from_the_last_complete_checkpoint(tmp_path, trained):
    """A run that saves every step is killed (SIGKILL) while it writes a checkpoint: the tracker
    still names the previous one. The same command resumes from it, at the next step, trains the
    interrupted step again to the same loss, and ends where the uninterrupted run would."""
    ckpt = tmp_path / "ckpt"
    argv = [*TINY, "--train-iters", "8", "--eval-interval", "100", "--save-interval", "1",
            "--save", str(ckpt), "--load", str(ckpt), "--dirmoe-data-cache", str(trained[0])]
    cmd = [sys.executable, "-m", "megatron_dirmoe.pretrain", *argv]
    tracker = ckpt / "latest_checkpointed_iteration.txt"

    def tracked() -> int:
        try:
            return int(tracker.read_text())
        except (OSError, ValueError):
            return 0

    def run_and_kill_during_a_save(log: Path) -> Optional[int]:
        """Start (or resume) the run; SIGKILL it once iter_<tracked + 1> exists while the tracker
        still names the one before (the save has begun and not finished). The iteration whose
        save was cut short, or None if the tracker moved on before the signal landed."""
        with open(log, "w") as sink:  # a file, not a pipe: nothing blocks the run's output
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=user_env())
            try:
                deadline = time.time() + 240
                while time.time() < deadline and proc.poll() is None:
                    last = tracked()
                    if last >= 3 and (ckpt / f"iter_{last + 1:07d}").is_dir():
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(timeout=60)
                        return last + 1 if tracked() == last else None
                    time.sleep(0.001)
            finally:
                proc.kill()
                proc.wait(timeout=60)
        raise AssertionError("the run ended before a save could be interrupted:\n"
                             + log.read_text()[-2000:])

    # A busy machine may deschedule this process between the check and the signal, letting the
    # save finish: then the same command (it resumes) is killed again at a later save.
    for attempt in range(3):
        log = tmp_path / f"attempt{attempt}.log"
        killed_at = run_and_kill_during_a_save(log)
        if killed_at is not None:
            break
    assert killed_at is not None, "three kills all landed after the save had finished"
    assert tracked() == killed_at - 1 and (ckpt / f"iter_{killed_at:07d}").is_dir()
    out = log.read_text()
    first = {int(i): float(v) for i, v in re.findall(r"iteration\s+(\d+)/8 \| lm loss (\S+)", out)}
    assert killed_at in first  # the step was trained and logged; its checkpoint was cut short

    done = subprocess.run(cmd, capture_output=True, text=True, env=user_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resumed from {ckpt} at iteration {killed_at - 1}" in done.stdout
    second = {int(i): float(v) for i, v in
              re.findall(r"iteration\s+(\d+)/8 \| lm loss (\S+)", done.stdout)}
    assert min(second) == killed_at and max(second) == 8
    assert second[killed_at] == first[killed_at]  # the same step, the same loss: nothing lost
    assert tracked() == 8
