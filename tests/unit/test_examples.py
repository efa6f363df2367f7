"""The user stories in examples/, each run at a tiny size (examples/export_to_hf.py has its own
test, tests/unit/test_examples_export.py)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from user_runs import REPO, user_env

EXAMPLES = REPO / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_docstring_or_header():
    for path in sorted(p for p in EXAMPLES.iterdir() if p.is_file()):  # not lm_eval_tasks/
        text = path.read_text()
        if path.suffix == ".py":
            assert re.match(r'#!.*\n"""\S', text), f"{path.name}: no module docstring"
        elif path.suffix == ".sh":
            assert re.match(r"#!.*\n# \S", text), f"{path.name}: no header comment"


def test_swap_router_custom_loop():
    """DirichletRouter swapped into Megatron's own local spec, trained in a plain loop: the loss
    falls, set_router_iteration drives tau_z from tau_start to tau_end, and the routers' values
    reach Megatron's tracker every step for every layer."""
    from megatron_dirmoe.router import DirichletRouter

    steps = 30
    result = _load("swap_router_custom_loop").main(["--steps", str(steps), "--log-interval", "10"])
    model, losses, metrics = result["model"], result["losses"], result["metrics"]
    assert sum(isinstance(m, DirichletRouter) for m in model.modules()) == 2
    assert type(model.decoder.layers[0].mlp).__name__ == "MoELayer"  # Megatron's own layer
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert len(metrics) == steps
    for step in metrics:
        assert len(step["dirmoe/active_experts"]) == 2
        assert all(1.0 <= v <= 4.0 for v in step["dirmoe/active_experts"])
        assert all(v > 0 for v in step["dirmoe/kl"])  # the Dirichlet KL is attached and logged
    assert metrics[0]["dirmoe/tau"][0] == pytest.approx(2.0)
    assert metrics[-1]["dirmoe/tau"][0] == pytest.approx(0.3, abs=0.01)


@pytest.fixture(scope="module")
def own_jsonl_run(tmp_path_factory):
    """examples/pretrain_own_jsonl.sh at 4 iterations: preprocess, train to 2, resume to 4."""
    work = tmp_path_factory.mktemp("own_jsonl")
    env = dict(user_env(), ITERS="4", PRETRAIN_FLAGS="--eval-iters 1 --log-interval 1")
    done = subprocess.run(["bash", str(EXAMPLES / "pretrain_own_jsonl.sh"), "", str(work)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work, done.stdout


def test_pretrain_own_jsonl_preprocesses_trains_and_resumes(own_jsonl_run):
    work, out = own_jsonl_run
    assert (work / "data" / "my_corpus_text_document.bin").is_file()
    assert "400 documents" in out
    first, rerun = out.split("--- rerun: resumes at iteration 2")
    assert "exiting at iteration 2 (--exit-interval)" in first
    assert f"resumed from {work}/ckpt at iteration 2 (16 samples consumed)" in rerun
    assert (work / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    losses = {int(i): float(v) for i, v in
              re.findall(r"iteration\s+(\d+)/4 \| lm loss ([\d.]+)", out)}
    assert sorted(losses) == [1, 2, 3, 4]  # 1-2 in the first run, 3-4 after the resume
    assert losses[4] < losses[1]


def test_plot_routing_metrics(own_jsonl_run, tmp_path):
    """The routing metrics of that run (a run and its resume: two event files) read back from
    TensorBoard and plotted."""
    from megatron_dirmoe.router import METRIC_NAMES

    work, _ = own_jsonl_run
    out = tmp_path / "routing.png"
    result = _load("plot_routing_metrics").main([str(work / "tb"), "--out", str(out),
                                                "--metrics", "all"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert set(result["tags"]) == set(METRIC_NAMES)
    assert result["plotted"] == sorted(name.removeprefix("dirmoe/") for name in METRIC_NAMES)
    assert result["per_layer"]["active_experts"] == [0, 1, 2, 3]
    means, _ = _load("plot_routing_metrics").read_routing_scalars(work / "tb")
    assert [step for step, _ in means["tau"]] == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="no dirmoe"):
        _load("plot_routing_metrics").main([str(tmp_path), "--out", str(tmp_path / "x.png")])
