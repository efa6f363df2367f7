"""scripts/bench_e2e.py trains the DirMoE and the TopK GPT through the entry point (2 steps on
CPU) and reports each run's throughput at its realised k."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_e2e_two_steps_on_cpu(tmp_path):
    from megatron_dirmoe.throughput import training_flops_per_token

    out = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_e2e.py"), "--size", "tiny", "--steps",
         "2", "--device", "cpu", "--json", str(out), "--variant", "mbs2=--micro-batch-size 2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DirMoE / TopK tokens/s" in proc.stdout
    result = json.loads(out.read_text())
    dirmoe, topk = result["dirmoe"], result["topk"]
    assert result["topk_k"] == max(1, round(dirmoe["active_experts"]))
    assert topk["active_experts"] == result["topk_k"]
    for run, router in ((dirmoe, "dirichlet"), (topk, "topk")):
        assert run["iteration"] == 2 and run["tokens_per_s"] > 0 and run["mfu"] is None
        assert run["step_ms"] == pytest.approx(1000 * 4 * 64 / run["tokens_per_s"])
        # The logged TFLOP/s is tokens/s x the model FLOPs per token at the logged k (the tiny
        # size's GPT; the NullTokenizer vocabulary 32000 is already a multiple of 128).
        args = SimpleNamespace(hidden_size=64, num_attention_heads=2, num_query_groups=None,
                               group_query_attention=False, seq_length=64, swiglu=True,
                               ffn_hidden_size=128, moe_ffn_hidden_size=128, num_experts=4,
                               num_layers=2, moe_layer_freq=1, padded_vocab_size=32000,
                               dirmoe_router=router)
        flops = training_flops_per_token(args, [run["active_experts"]] * 2)
        # Both numbers come from the log line: tokens/s to the unit, TFLOP/s to 4 digits.
        rel = 0.5 / run["tokens_per_s"] + 5e-4
        assert run["tflops_per_device"] == pytest.approx(run["tokens_per_s"] * flops / 1e12,
                                                         rel=rel)
    # The settings search: the variant with the highest TFLOP/s is the DirMoE row, and TopK
    # ran with its flags.
    variants = result["variants"]
    assert set(variants) == {"default", "mbs2"}
    assert result["winner"] == max(variants, key=lambda n: variants[n]["tflops_per_device"])
    assert dirmoe == variants[result["winner"]]
    assert result["winner_flags"] == ({"default": [], "mbs2": ["--micro-batch-size", "2"]}
                                      [result["winner"]])
    assert result["tokens_per_s_ratio"] == pytest.approx(
        dirmoe["tokens_per_s"] / topk["tokens_per_s"])
