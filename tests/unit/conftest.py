"""One real `dirmoe-pretrain --preset tiny` process, shared by the tests that look at what a user
sees: the README's commands (tests/unit/test_readme.py), the TensorBoard logs and the quiet
start-up (tests/unit/test_startup_and_logs.py)."""

from __future__ import annotations

import pytest
from user_runs import PretrainRun, run_pretrain


@pytest.fixture(scope="session")
def tiny_preset_run(tmp_path_factory) -> PretrainRun:
    """The README's first command, `dirmoe-pretrain --preset tiny`, at TINY_ITERS iterations."""
    run = run_pretrain(["--preset", "tiny"], tmp_path_factory.mktemp("tiny_preset"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run
