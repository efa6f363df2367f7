"""scripts/compare_routers.py: aggregation on synthetic records, and a short end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import sys
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_routers.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_routers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _record(router, seed, k, active_end, loss, dirmoe=True, mi=0.1):
    layer = {"active_experts": active_end, "load_cv": 0.5, "effective_experts": 4.0,
             "mi_bits": mi, "mi_normalized": mi / 3, "routing_entropy_bits": 1.0,
             "load_fraction": [0.125] * 8, "layer": 1}
    return {"router": router, "label": router, "target_k": k, "dirmoe": dirmoe, "seed": seed,
            "heldout_loss": loss, "tokens_per_s": 1000.0 + seed,
            "train_active_end": active_end if dirmoe else None,
            "fallback_end": 0.0 if dirmoe else None, "capped_end": 0.0 if dirmoe else None,
            "layers": [layer, dict(layer, layer=2, mi_bits=3 * mi)]}


def test_summary_means_spread_and_error_against_k(compare):
    records = [_record("d2", 1, 2, 2.2, 5.0), _record("d2", 2, 2, 1.8, 5.2),
               _record("t1", 1, 1, 1.0, 5.1, dirmoe=False)]
    rows = {row["router"]: row for row in compare.summarize(records)}
    d2 = rows["d2"]
    assert d2["seeds"] == 2
    assert d2["heldout_loss"] == pytest.approx(5.1)
    assert d2["heldout_loss_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 5.0, 5.2
    assert d2["train_active"] == pytest.approx(2.0)
    assert d2["active_error_pct"] == pytest.approx(0.0)
    assert d2["active_error_pct_std"] == pytest.approx(math.sqrt(200.0))  # +10%, -10%
    assert d2["mi_bits"] == pytest.approx(0.2)  # mean over layers 0.1 and 0.3
    t1 = rows["t1"]
    assert t1["train_active"] == 1.0 and t1["active_error_pct"] == 0.0  # TopK: exactly k
    assert math.isnan(t1["fallback"])
    table = compare.markdown_table(list(rows.values()))
    assert "| d2 | 2 | 5.100 ± 0.141 |" in table
    assert "| t1 | 1 |" in table and "–" in table


def test_paired_differences_pair_seeds_of_the_same_k(compare):
    records = [_record("d2", 1, 2, 2.0, 5.00), _record("d2", 2, 2, 2.0, 5.30),
               _record("d2", 3, 2, 2.0, 5.10),
               _record("t2", 1, 2, 2.0, 5.10, dirmoe=False),
               _record("t2", 2, 2, 2.0, 5.20, dirmoe=False),  # seed 3 missing: not paired
               _record("t1", 1, 1, 1.0, 4.00, dirmoe=False)]  # another k: never paired
    for record, ood in zip(records, (6.0, 6.5, 7.0, 5.0, 6.0, 1.0)):
        record["ood"] = {"layers": [{"effective_experts": ood}]}
    (pair,) = compare.paired_differences(records)
    assert (pair["router"], pair["baseline"], pair["seeds"]) == ("d2", "t2", [1, 2])
    loss = pair["heldout_loss"]
    assert loss["per_seed"] == pytest.approx([-0.10, 0.10])
    assert loss["mean"] == pytest.approx(0.0)
    # sd of (-0.1, 0.1) is sqrt(0.02); the standard error divides it by sqrt(2 seeds).
    assert loss["se"] == pytest.approx(0.1)
    ood = pair["ood_effective_experts"]
    assert ood["per_seed"] == pytest.approx([1.0, 0.5]) and ood["mean"] == pytest.approx(0.75)
    table = compare.paired_table([pair])
    assert "| d2 | t2 | 2 | +0.000 ± 0.100 (-0.100 / +0.100) | +0.75 ± 0.25 (+1.00 / +0.50) |" in table


def test_router_flags_use_the_one_entry_point(compare):
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    for name, spec in compare.routers("1e-2").items():
        args = parse_pretrain_args(["--preset", "tiny", *spec.flags, "--dirmoe-device", "cpu"],
                                   validate=False)
        assert args.dirmoe_router == ("dirichlet" if spec.dirmoe else "topk"), name
        if not spec.dirmoe:
            assert args.moe_router_topk == spec.target_k, name


def test_short_comparison_end_to_end(compare, tmp_path):
    """Two routers, 3 steps each: records, table and all five pictures are written."""
    out, work = tmp_path / "out", tmp_path / "work"
    compare.main(["--out", str(out), "--work", str(work), "--routers", "dirmoe-k2",
                  "softmax-top1", "--seeds", "7", "--jobs", "2", "--",
                  "--train-iters", "3", "--eval-interval", "3", "--eval-iters", "1",
                  "--log-interval", "1"])
    for name in ("results.md", "results.json", "loss_curves.png", "active_experts.png",
                 "schedules.png", "expert_load.png", "load_over_training.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {r["router"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"dirmoe-k2", "softmax-top1"}
    assert rows["softmax-top1"]["eval_active"] == 1.0  # TopK routes exactly k on held-out data
    # Three steps from initialisation, where DirMoE routes as top-k: k = 2 on held-out data
    # (2.0 measured), and neither router has collapsed onto a few of the 8 experts (5.3 and 5.1
    # effective experts measured).
    assert rows["dirmoe-k2"]["eval_active"] == pytest.approx(2.0, rel=0.1)
    for row in rows.values():
        assert math.isfinite(row["heldout_loss"]) and 5.0 < row["heldout_loss"] < 9.0
        assert row["effective_experts"] >= 4.0
    record = json.loads((work / "records" / "dirmoe-k2_seed7.json").read_text())
    assert [h["iteration"] for h in record["history"]] == [1, 2, 3]
    assert len(record["history"][0]["dirmoe/active_experts"]) == 4  # one value per MoE layer
    # Every router's load is followed in training; DirMoE's own metrics count the same tokens.
    topk = json.loads((work / "records" / "softmax-top1_seed7.json").read_text())
    assert all(len(h["router/effective_experts"]) == 4 for h in topk["history"])
    for row in record["history"]:
        assert row["router/effective_experts"] == pytest.approx(row["dirmoe/effective_experts"],
                                                                rel=1e-4)
    assert record["heldout_tokens"] == 256 * 128
    # The header says how many steps ran when flags after `--` override the preset's 300.
    assert "steps trained: 3 (flags after `--`)" in (out / "results.md").read_text()
    assert "test split" in (out / "results.md").read_text()
    # Rerunning reuses the records instead of training again.
    compare.main(["--out", str(out), "--work", str(work), "--routers", "dirmoe-k2",
                  "softmax-top1", "--seeds", "7", "--render-only"])


def test_diagnose_router_drift_prints_one_row_per_moe_layer(tmp_path):
    # Its own process: the run installs Megatron global state (args, a 4-layer metrics tracker)
    # that later in-process tests must not inherit.
    import subprocess

    done = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "diagnose_router_drift.py"), "--preset", "tiny",
         "--train-iters", "2", "--eval-iters", "0", "--save", str(tmp_path / "ckpt"),
         "--load", str(tmp_path / "ckpt"), "--dirmoe-data-cache", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    rows = out[out.index("router inputs on"):].splitlines()[2:]
    assert [int(row.split()[0]) for row in rows] == [1, 2, 3, 4]
    for row in rows:
        mean_norm, token_norm = float(row.split()[1]), float(row.split()[2])
        assert 0 <= mean_norm <= token_norm  # |mean h| <= mean |h| (triangle inequality)


def test_paired_seeds_pairs_two_work_folders(tmp_path, capsys):
    """scripts/paired_seeds.py: a probe's runs minus the reference's, on the common seeds."""
    spec = importlib.util.spec_from_file_location("paired_seeds", SCRIPT.parent / "paired_seeds.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    for work, losses in (("probe", (5.00, 5.30, 5.10)), ("ref", (5.10, 5.20))):
        (tmp_path / work / "records").mkdir(parents=True)
        for seed, loss in enumerate(losses, start=1):
            record = _record("d2", seed, 2, 2.0, loss)
            record["ood"] = {"layers": [{"effective_experts": 6.0}] * 2}
            path = tmp_path / work / "records" / f"d2_seed{seed}.json"
            path.write_text(json.dumps(record))
    stats = paired.main([f"{tmp_path / 'probe'}:d2", f"{tmp_path / 'ref'}:d2"])
    assert stats["seeds"] == [1, 2]
    assert stats["heldout_loss"]["per_seed"] == pytest.approx([-0.10, 0.10])
    out = capsys.readouterr().out
    assert "held-out loss (lower is better): +0.000 ± 0.100" in out
    # DirMoE's routing at the end, per side (no training history here: no count spread).
    assert ("count train 2.000 (held out 2.000, standard deviation over the last 100 steps "
            "n/a), least-loaded expert 1.00 (lowest seed 1.00), fallback at the end 0.000") in out
    with pytest.raises(SystemExit, match="no records"):
        paired.main([f"{tmp_path / 'probe'}:d3", f"{tmp_path / 'ref'}:d2"])
    with pytest.raises(SystemExit, match="--windows"):  # the records above hold no history
        paired.main([f"{tmp_path / 'probe'}:d2", f"{tmp_path / 'ref'}:d2", "--windows", "2"])
    with pytest.raises(SystemExit, match="not WORK:ROUTER"):
        paired.main(["probe", f"{tmp_path / 'ref'}:d2"])


def test_paired_seeds_windows_locate_the_training_gap(tmp_path, capsys, compare):
    """--windows: the paired training-loss gap per window of steps and each side's effective
    experts over training, from every router's followed load or DirMoE's own metrics."""
    spec = importlib.util.spec_from_file_location("paired_seeds", SCRIPT.parent / "paired_seeds.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    # Probe: loss 1.0 above the reference in steps 3-4 on seed 1 and 3.0 above on seed 2.
    for work, key, offsets in (("probe", "dirmoe/effective_experts", (1.0, 3.0)),
                               ("ref", "router/effective_experts", (0.0, 0.0))):
        (tmp_path / work / "records").mkdir(parents=True)
        for seed, offset in enumerate(offsets, start=1):
            history = [{"iteration": i + 1, "loss": 5.0 + (offset if i >= 2 else 0.0),
                        key: [2.0 * (i + 1), 4.0 * (i + 1)]} for i in range(4)]
            if work == "probe":  # DirMoE: half the tokens on the fallback in steps 1-2
                for i, row in enumerate(history):
                    row["dirmoe/fallback_frac"] = [1.0, 0.0] if i < 2 else [0.0, 0.0]
            record = dict(_record("d2", seed, 2, 2.0, 5.0), history=history)
            (tmp_path / work / "records" / f"d2_seed{seed}.json").write_text(json.dumps(record))
    stats = paired.main([f"{tmp_path / 'probe'}:d2", f"{tmp_path / 'ref'}:d2", "--windows", "2"])
    first, second = stats["windows"]
    assert first["steps"] == (1, 2) and second["steps"] == (3, 4)
    assert first["loss_gap"] == pytest.approx(0.0) and first["se"] == pytest.approx(0.0)
    assert second["loss_gap"] == pytest.approx(2.0)
    assert second["se"] == pytest.approx(1.0)  # sd of (1, 3) / sqrt(2)
    # Steps 1-2: layer means 3 and 6 -> 4.5; both sides read the same curves.
    assert first["effective"] == first["reference_effective"] == pytest.approx(4.5)
    assert (first["fallback"], second["fallback"]) == (pytest.approx(0.5), pytest.approx(0.0))
    assert first["reference_fallback"] is None  # a router without a fallback
    assert "steps 3-4: +2.0000 ± 1.0000; effective experts 10.5 / 10.5" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--windows must be in 1..4"):
        paired.main([f"{tmp_path / 'probe'}:d2", f"{tmp_path / 'ref'}:d2", "--windows", "5"])
    # A history without any load column: no curve, so the picture leaves the router out.
    assert compare.training_effective_experts({"history": [{"loss": 1.0}]}) == []
