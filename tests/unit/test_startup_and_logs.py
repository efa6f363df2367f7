"""What a user of `dirmoe-pretrain` sees: TensorBoard logs with the routing metrics out of the box,
W&B through Megatron's own flags, and a quiet start (the known-benign Megatron/TE/apex/torch
notices collapsed into one line, every other warning still shown)."""

from __future__ import annotations

import importlib.machinery
import io
import logging
import re
import sys
import types
import warnings

import pytest
from user_runs import TINY_ITERS

from megatron_dirmoe.training import startup_noise


def _scalars(logdir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_dir_gets_the_routing_metrics(tiny_preset_run):
    """tensorboard is a dependency, so --tensorboard-dir writes out of the box: the mean of every
    dirmoe/* metric per step, each layer's with --moe-per-layer-logging, and Megatron's scalars."""
    from megatron_dirmoe.router import METRIC_NAMES

    assert "TensorBoard writing requested but is not available" not in tiny_preset_run.stdout
    scalars = _scalars(tiny_preset_run.tensorboard_dir)
    steps = list(range(1, TINY_ITERS + 1))
    for name in METRIC_NAMES:  # dirmoe/active_experts, dirmoe/kl, dirmoe/tau, ...
        assert [s for s, _ in scalars[name]] == steps, name
        for layer in range(4):  # the tiny preset's 4 MoE layers, numbered from 0 by Megatron
            assert [s for s, _ in scalars[f"moe/{name}_layer_{layer}"]] == steps, (name, layer)
    assert scalars["dirmoe/tau"][0][1] == pytest.approx(2.0)  # tau_start at iteration 0
    active = [v for _, v in scalars["dirmoe/active_experts"]]
    assert all(1.0 <= v <= 4.0 for v in active)  # k = 1, cap min(E, 4k) = 4
    for tag in ("lm loss", "learning-rate", "grad-norm", "lm loss validation"):
        assert tag in scalars, sorted(scalars)


def test_quiet_start_one_summary_line(tiny_preset_run):
    """The start-up of the tiny preset: one line instead of Megatron's TE/apex warnings, none of
    the collapsed messages, no one_logger notice."""
    out, err = tiny_preset_run.stdout, tiny_preset_run.stderr
    line = startup_noise.summary_line()
    if line is not None:  # TE or apex missing (always on CPU CI)
        assert err.count(line) == 1, err
        assert (out + err).count("Transformer Engine") == 1
    patterns = [m for m, _, _ in startup_noise.WARNING_MESSAGES]
    patterns += [m for ms in startup_noise.LOG_MESSAGES.values() for m in ms]
    for pattern in patterns:
        assert not re.search(pattern, out + err, re.I), pattern
    assert "one_logger" not in out
    assert "Warning" not in err, err  # nothing else warned in this run


def test_first_run_prints_no_dataset_builder_lines(tiny_preset_run):
    """What the tiny preset prints before its first iteration: the padded vocabulary and the
    run's one-line summary on stdout, the TE/apex line on stderr; none of the ~25 INFO lines of
    Megatron's dataset builder (index files, sample counts), the micro-batch count or the LR
    decay style that the command line already states."""
    out = tiny_preset_run.stdout.splitlines()
    first = next(i for i, line in enumerate(out) if line.lstrip().startswith("iteration "))
    # (Megatron announces the writer of the fixture's --tensorboard-dir; a user's first run has
    # no such flag.)
    before = [line for line in out[:first] if line != "> setting tensorboard ..."]
    assert len(before) == 2, before
    assert before[0].startswith("INFO:megatron.core.tokenizers") and "padded vocab" in before[0]
    assert before[1].startswith("[dirmoe] CPU training:")
    assert len(tiny_preset_run.stderr.splitlines()) <= 1
    everything = tiny_preset_run.stdout + tiny_preset_run.stderr
    for logger in startup_noise.QUIET_INFO_LOGGERS:
        assert f"INFO:{logger}" not in everything, logger


@pytest.fixture
def logger_levels():
    """Restore the levels that `install` / `apply_logging_level` change."""
    names = ["", *startup_noise.QUIET_INFO_LOGGERS]
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)
    startup_noise._quieted.clear()


def _dataset_logger_enabled() -> bool:
    return logging.getLogger("megatron.core.datasets.gpt_dataset").isEnabledFor(logging.INFO)


def test_logging_level_or_show_all_brings_the_info_lines_back(logger_levels, monkeypatch):
    monkeypatch.delenv("MEGATRON_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("DIRMOE_STARTUP_WARNINGS", raising=False)
    logging.getLogger().setLevel(logging.INFO)  # what megatron.training's basicConfig sets
    startup_noise.install(stream=io.StringIO())
    assert not _dataset_logger_enabled()
    startup_noise.apply_logging_level(None)  # no --logging-level: stays quiet
    assert not _dataset_logger_enabled()
    startup_noise.apply_logging_level(logging.INFO)  # --logging-level 20, as megatron.training
    assert _dataset_logger_enabled()
    assert logging.getLogger().level == logging.INFO

    for n in startup_noise.QUIET_INFO_LOGGERS:  # fresh process again
        logging.getLogger(n).setLevel(logging.NOTSET)
    monkeypatch.setenv("MEGATRON_LOGGING_LEVEL", "20")  # Megatron's variable: not quieted
    startup_noise.install(stream=io.StringIO())
    assert _dataset_logger_enabled()
    monkeypatch.delenv("MEGATRON_LOGGING_LEVEL")
    monkeypatch.setenv("DIRMOE_STARTUP_WARNINGS", "all")  # every start-up message
    assert startup_noise.install(stream=io.StringIO()) is False
    assert _dataset_logger_enabled()


def test_logging_level_flag_reaches_the_entry(monkeypatch):
    """`--logging-level` is Megatron's own flag, parsed by the entry's parser."""
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    args = parse_pretrain_args(["--preset", "tiny", "--logging-level", "20"], validate=False)
    assert args.logging_level == 20


def test_unrelated_warnings_still_show():
    """Only the exact known messages from the modules that raise them are hidden."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # (pytest's own config ignores UserWarning)
        assert startup_noise.install(stream=io.StringIO())
        for message, module in [
            ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
             "megatron.core.optimizer"),  # hidden
            ("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends"),
            ("Transformer Engine and Apex are not installed.", "my_project.train"),  # not Megatron
            ("Only transformer-engine>=1.7.0 supports MoE experts, but your version is 1.6.0. "
             "Use local linear implementation instead.", "megatron.core.extensions.x"),  # old TE
            ("Some real problem in Megatron", "megatron.core.optimizer"),
        ]:
            warnings.warn_explicit(message, UserWarning, "f.py", 1, module=module)
        warnings.warn("an unrelated warning")
    shown = [str(w.message) for w in caught]
    assert shown == [
        "Transformer Engine and Apex are not installed.",
        "Only transformer-engine>=1.7.0 supports MoE experts, but your version is 1.6.0. "
        "Use local linear implementation instead.",
        "Some real problem in Megatron",
        "an unrelated warning",
    ]


def test_log_filters_drop_only_the_known_records(caplog):
    startup_noise.install(stream=io.StringIO())
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    with caplog.at_level(logging.WARNING):
        logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        logger.warning("a real problem while building GPTModel")
    assert [r.getMessage() for r in caplog.records] == ["a real problem while building GPTModel"]


def test_summary_line_names_what_is_missing_and_the_escape_hatch(monkeypatch):
    monkeypatch.setattr(startup_noise, "_missing", lambda: ["NVIDIA apex"])
    line = startup_noise.summary_line()
    assert line.startswith("[dirmoe] NVIDIA apex not installed: Megatron uses PyTorch fallbacks")
    assert "DIRMOE_STARTUP_WARNINGS=all" in line
    monkeypatch.setattr(startup_noise, "_missing", lambda: [])
    assert startup_noise.summary_line() is None
    monkeypatch.setenv("DIRMOE_STARTUP_WARNINGS", "all")
    assert startup_noise.install() is False


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("embedded_corpus"))


def _wandb_argv(tmp_path, data_cache):
    return ["--preset", "tiny", "--train-iters", "2", "--eval-iters", "1", "--dirmoe-device", "cpu",
            "--save", str(tmp_path), "--load", str(tmp_path), "--dirmoe-data-cache", data_cache,
            "--wandb-project", "dirmoe-test", "--wandb-exp-name", "tiny",
            "--wandb-save-dir", str(tmp_path / "wandb")]


def test_wandb_without_the_package_is_a_clear_error(tmp_path, data_cache, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    from megatron_dirmoe.pretrain import main

    with pytest.raises(SystemExit, match="--wandb-project 'dirmoe-test' needs the wandb package"):
        main(_wandb_argv(tmp_path, data_cache))


def test_wandb_flags_log_through_megatrons_writer(tmp_path, data_cache, monkeypatch):
    """--wandb-project/--wandb-exp-name: Megatron's own writer (wandb.init with its arguments),
    fed the loss, learning rate and every dirmoe/* metric per step, finished at the end, as
    megatron.training does. A stand-in module records the calls (wandb need not be installed)."""
    from megatron.training.global_vars import unset_global_variables

    from megatron_dirmoe.pretrain import main

    calls = {"init": [], "log": [], "finish": 0}
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls["init"].append(kwargs)
    fake.log = lambda data, step=None: calls["log"].append((step, dict(data)))
    fake.finish = lambda: calls.__setitem__("finish", calls["finish"] + 1)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    try:
        main(_wandb_argv(tmp_path, data_cache))
    finally:
        unset_global_variables()
    (init,) = calls["init"]
    assert init["project"] == "dirmoe-test" and init["name"] == "tiny"
    assert init["config"]["num_experts"] == 8 and init["config"]["dirmoe_router"] == "dirichlet"
    logged = {(step, key) for step, data in calls["log"] for key in data}
    for step in (1, 2):
        for key in ("lm loss", "learning-rate", "dirmoe/active_experts", "dirmoe/kl", "dirmoe/tau"):
            assert (step, key) in logged, (step, key)
    assert calls["finish"] == 1
