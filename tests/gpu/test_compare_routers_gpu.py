"""The gpu-small router comparison, shortened to a few steps per router, on one GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_routers.py"


def test_gpu_small_preset_runs_every_router_kind(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_routers", SCRIPT)
    compare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compare  # dataclasses look their module up there
    spec.loader.exec_module(compare)
    out, work = tmp_path / "out", tmp_path / "work"
    compare.main(["--preset", "gpu-small", "--out", str(out), "--work", str(work),
                  "--routers", "dirmoe-k2-paper-aux", "softmax-top2", "sigmoid-top2-bias",
                  "sinkhorn-top1", "--", "--train-iters", "4", "--eval-interval", "4",
                  "--eval-iters", "1", "--log-interval", "2"])
    rows = {r["router"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"dirmoe-k2-paper-aux", "softmax-top2", "sigmoid-top2-bias", "sinkhorn-top1"}
    for row in rows.values():
        assert 5.0 < row["heldout_loss"] < 10.0 and row["tokens_per_s"] > 0
    record = json.loads((work / "records" / "dirmoe-k2-paper-aux_seed1234.json").read_text())
    assert record["device"] == "cuda" and len(record["layers"]) == 8
