"""DirMoE routing metrics in Megatron's logs (console, TensorBoard, W&B).

The routers record per-layer scalars in Megatron's global MoE metrics tracker under
:data:`megatron_dirmoe.router.METRIC_NAMES`. `megatron.training`'s ``training_log`` reports only
the tracker names it knows (load-balancing and z losses) and then clears the whole tracker, so
the DirMoE names would never be written. :class:`DirMoEMetricsTracker` is a drop-in tracker
(installed with Megatron's own ``set_moe_metrics_tracker``) whose ``report`` adds the DirMoE
names to whatever the caller asked for: Megatron then syncs them across PP/TP/DP, writes the mean
over MoE layers to TensorBoard/W&B as ``dirmoe/<name>`` (per layer with
``--moe-per-layer-logging``) and appends them to its console line. The tracker also keeps the
last reported per-layer values for :func:`routing_summary`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from megatron.core.transformer.moe.moe_logging import (
    MoEMetricsTracker,
    get_moe_metrics_tracker,
    set_moe_metrics_tracker,
)

from megatron_dirmoe.router import METRIC_NAMES

__all__ = ["DirMoEMetricsTracker", "install_metrics_tracker", "routing_summary",
           "format_routing_summary"]


class DirMoEMetricsTracker(MoEMetricsTracker):
    """Megatron's MoE metrics tracker that also reports the DirMoE metrics."""

    def __init__(self, extra_names=METRIC_NAMES) -> None:
        super().__init__()
        self.extra_names = tuple(extra_names)
        self.last_per_layer: Dict[str, torch.Tensor] = {}
        self.last_iteration: Optional[int] = None
        self._throughput = None

    def enable_throughput(self, meter, log_interval: int,
                          interval_seconds: Callable[[], float]) -> None:
        """Append tokens/s, TFLOP/s and MFU at the realised k to every ``log_interval``-th report
        (`megatron_dirmoe.throughput`); `interval_seconds` gives the wall time since the last
        log line. `megatron.training` calls ``report`` once per iteration."""
        self._throughput = (meter, log_interval, interval_seconds)

    def report(self, loss_scale, iteration, *args, track_names=None, **kwargs) -> str:
        from megatron_dirmoe.throughput import log_throughput

        if track_names is not None:
            names = [track_names] if isinstance(track_names, str) else list(track_names)
            track_names = names + [n for n in self.extra_names if n not in names]
        self.last_iteration = iteration
        text = super().report(loss_scale, iteration, *args, track_names=track_names, **kwargs)
        if self._throughput is not None:
            meter, log_interval, interval_seconds = self._throughput
            meter.add_step(self.last_per_layer.get("dirmoe/active_experts"))
            if iteration % log_interval == 0:
                speed = meter.report(interval_seconds())
                log_throughput(speed, iteration, kwargs.get("writer"), kwargs.get("wandb_writer"))
                text = (text or "") + (speed.format() if speed else "")
        return text

    def _aggregate(self, loss_scale, num_moe_layers, metric_names, percentiles=None):
        # Called after the cross-rank sync and before the tracker is cleared.
        self.last_per_layer = {
            name: self._metrics[name].values.float().cpu() * loss_scale
            for name in metric_names
            if name in self._metrics and name.startswith("dirmoe/")
        }
        return super()._aggregate(loss_scale, num_moe_layers, metric_names, percentiles)


def install_metrics_tracker() -> DirMoEMetricsTracker:
    """Make a :class:`DirMoEMetricsTracker` Megatron's global MoE tracker (idempotent)."""
    tracker = get_moe_metrics_tracker()
    if not isinstance(tracker, DirMoEMetricsTracker):
        tracker = DirMoEMetricsTracker()
        set_moe_metrics_tracker(tracker)
    return tracker


def routing_summary(per_layer: Dict[str, torch.Tensor], moe_layers: List[int]) -> List[dict]:
    """One dict per MoE layer (1-based layer numbers) from a tracker's per-layer values."""
    rows = []
    for layer in moe_layers:
        row = {"layer": layer}
        for name, values in per_layer.items():
            row[name.removeprefix("dirmoe/")] = float(values[layer - 1])
        rows.append(row)
    return rows


_SUMMARY_COLUMNS = (
    ("active_experts", "active"),
    ("eval_active_experts", "eval_active"),
    ("expected_k", "E[k]"),
    ("effective_experts", "eff_experts"),
    ("fallback_frac", "fallback"),
    ("capped_frac", "capped"),
    ("max_load", "max_load"),
    ("kl", "kl"),
    ("sparsity_penalty", "sparsity"),
    ("balance_penalty", "balance"),
)


def format_routing_summary(rows: List[dict], target_k: int, num_experts: int) -> str:
    """A fixed-width table: realised active experts vs target k, expected k, effective experts,
    fallback/cap fractions, per MoE layer."""
    columns = [(key, title) for key, title in _SUMMARY_COLUMNS if any(key in r for r in rows)]
    head = f"{'layer':>5} " + " ".join(f"{title:>11}" for _, title in columns)
    lines = [f"routing summary (target k = {target_k}, experts = {num_experts})", head]
    for row in rows:
        cells = " ".join(
            f"{row[key]:>11.3f}" if key in row else f"{'-':>11}" for key, _ in columns
        )
        lines.append(f"{row['layer']:>5} {cells}")
    return "\n".join(lines)
