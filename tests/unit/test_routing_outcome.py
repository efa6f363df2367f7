"""Where training takes the router: the README's tiny run (`dirmoe-pretrain --preset tiny`, 300
steps of 1024 tokens, 8 experts, target k = 1) ends with the realised number of experts per token
within 10% of the target in every MoE layer, and with balanced load: at least 0.7 E effective
experts (from the last step's global load). A routing or loss change that lets the count drift or
the experts collapse fails here. Measured (2026-12-06, 2 heavily shared CPU cores): k 1.077 / 1.010
/ 1.021 / 1.007 and 6.65 / 7.33 / 7.36 / 7.26 effective experts in layers 1-4 (47 s of training on
2 idle cores, README)."""

from __future__ import annotations

import pytest

TARGET_K, EXPERTS = 1, 8


@pytest.mark.slow
def test_tiny_run_ends_at_the_target_k_with_balanced_load(tmp_path):
    from megatron_dirmoe.pretrain import main

    result = main(["--preset", "tiny", "--save", str(tmp_path / "ckpt"),
                   "--load", str(tmp_path / "ckpt"), "--save-interval", "100000",
                   "--eval-iters", "0", "--log-interval", "100",
                   "--dirmoe-data-cache", str(tmp_path / "data")])
    assert result.iteration == 300
    rows = {row["layer"]: row for row in result.routing}
    assert sorted(rows) == [1, 2, 3, 4]
    for layer, row in rows.items():
        assert row["active_experts"] == pytest.approx(TARGET_K, rel=0.10), (layer, row)
        assert row["effective_experts"] >= 0.7 * EXPERTS, (layer, row)
