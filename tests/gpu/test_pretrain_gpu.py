"""`torchrun -m megatron_dirmoe.pretrain` through `megatron.training.pretrain` on one GPU:
a few dozen bf16 iterations on the embedded corpus with falling loss, the DirMoE metrics in
Megatron's console line, and a checkpoint in Megatron's layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ITERS = 40
ARGS = [
    "--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4",
    "--ffn-hidden-size", "512", "--moe-ffn-hidden-size", "512", "--num-experts", "8",
    "--seq-length", "256", "--max-position-embeddings", "256",
    "--micro-batch-size", "8", "--global-batch-size", "16",
    "--train-iters", str(ITERS), "--lr", "2e-3", "--min-lr", "2e-4",
    "--log-interval", "5", "--eval-interval", "20", "--eval-iters", "2", "--save-interval", "40",
    "--dirmoe-target-k", "2",  # k >= 2: the load controller is on as well
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pretrain_megatron_training_path(tmp_path):
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", "29517", "-m", "megatron_dirmoe.pretrain", *ARGS,
           "--save", str(save), "--load", str(save), "--dirmoe-data-cache", str(tmp_path / "data"),
           "--tensorboard-dir", str(tmp_path / "tb")]
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    lines = [l for l in out.splitlines() if re.search(r"iteration\s+\d+/\s*\d+", l)]
    losses = [float(m.group(1)) for l in lines if (m := re.search(r"lm loss: ([0-9.Ee+-]+)", l))]
    assert len(losses) >= ITERS // 5, out[-4000:]  # every --log-interval (and iteration 1)
    assert losses[-1] < losses[0] - 1.0, losses
    # The DirMoE metrics reach Megatron's console line (and with it TensorBoard/W&B).
    last = lines[-1]
    for name in ("dirmoe/active_experts", "dirmoe/expected_k", "dirmoe/effective_experts",
                 "dirmoe/kl", "dirmoe/tau", "dirmoe/prior_scale"):
        assert name in last, last
    tau = float(re.search(r"dirmoe/tau: ([0-9.]+)", last).group(1))
    assert tau == pytest.approx(0.3, abs=0.02)
    # The count and load controllers step inside Megatron's finalize_model_grads (wrapped by our forward
    # step): its c is logged, and the warning for an unstepped controller stays silent.
    assert "dirmoe/count_bias" in last, last
    spread = float(re.search(r"dirmoe/load_bias_spread: ([0-9.]+)", last).group(1))
    assert spread > 0, last  # the load controller's b moved (stepped in the same place)
    assert "count controller has not been stepped" not in out
    assert "routing summary" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    assert (save / f"iter_{ITERS:07d}").is_dir()

    # ... and TensorBoard, through Megatron's own writer (when tensorboard can be read here).
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"dirmoe/active_experts", "dirmoe/tau", "dirmoe/kl", "lm loss"} <= tags, sorted(tags)
    assert len(events.Scalars("dirmoe/active_experts")) >= ITERS // 5
