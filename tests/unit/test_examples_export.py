"""examples/export_to_hf.py end to end at tiny sizes: train a few CPU steps, export, load with
AutoTokenizer + AutoModelForCausalLM (trust_remote_code) and pipeline, generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_export_to_hf_example_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "export_to_hf.py"), "--workdir", str(tmp_path),
         "--train-iters", "2", "--max-new-tokens", "6", "--pipeline",
         # dirmoe-pretrain flags: a smaller model than the tiny preset, no evaluation.
         "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--moe-ffn-hidden-size", "64", "--num-experts", "4", "--seq-length", "64",
         "--max-position-embeddings", "64", "--micro-batch-size", "2",
         "--global-batch-size", "2", "--eval-iters", "0"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    summary = json.loads(next(line for line in lines if line.startswith("{")))
    assert summary["iteration"] == 2 and summary["max_abs_logit_diff"] <= 1e-4
    generated = next(line for line in lines if line.startswith("generated: "))
    piped = next(line for line in lines if line.startswith("pipeline: "))
    prompt = "ROMEO.\nBut soft, what light"  # the script's default
    assert generated.startswith(f"generated: {prompt!r}"[:-1])
    assert piped.startswith(f"pipeline: {prompt!r}"[:-1])
    hf = tmp_path / "hf"
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "modeling_dirmoe.py"} <= {p.name for p in hf.iterdir()}
