"""DirMoE routing metrics in Megatron's logs (console, TensorBoard, W&B).

Every `DirichletRouter` forward that builds the graph adds one row of *sums* to the tracker
(:func:`record_routing_row`): the routing statistics of its real tokens
(`megatron_dirmoe.routing.routing_statistics`: counts, sums and a histogram of experts per
token), the tokens routed to each expert, and the schedule values. Rows of micro-batches add up
in place, on the device. Once per step, ``report`` all-reduces the whole [layers, row] tensor in
**one** collective over all ranks (data-, tensor-, context-, expert- and pipeline-parallel: each
rank fills the rows of its own layers with its own tokens), derives every metric of
:data:`METRIC_NAMES` from the global sums on the device, and copies them to the host **once**.
The metrics are therefore those of the step's whole global batch, whatever the layout: loads and
effective experts come from globally reduced loads, ``active_experts_max`` is the true maximum
(from the histogram), and a mean is a mean over all tokens, not a mean of per-shard means.

`megatron.training`'s ``training_log`` reports only the tracker names it knows (load-balancing
and z losses); :class:`DirMoEMetricsTracker` is a drop-in for Megatron's tracker (installed with
Megatron's own ``set_moe_metrics_tracker``) whose ``report`` adds the DirMoE metrics: the mean
over MoE layers (the maximum for ``active_experts_max``) to TensorBoard/W&B as
``dirmoe/<name>`` (per layer as ``moe/dirmoe/<name>_layer_<i>`` with
``--moe-per-layer-logging``, Megatron's naming) and to its console line. The tracker also keeps
the last step's per-layer values for :func:`routing_summary`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from megatron.core.transformer.moe.moe_logging import (
    MoEMetricsTracker,
    get_moe_metrics_tracker,
    set_moe_metrics_tracker,
)

from megatron_dirmoe.routing import STAT_SUMS, routing_statistics_width

__all__ = ["DirMoEMetricsTracker", "install_metrics_tracker", "record_routing_row",
           "routing_row_width", "routing_metrics", "routing_summary", "format_routing_summary",
           "METRIC_NAMES", "SCHEDULE_COLUMNS"]

# Per-layer metrics derived from the reduced rows (names end without "loss" so Megatron's
# `total_loss_dict` handling leaves them alone).
METRIC_NAMES = tuple(f"dirmoe/{name}" for name in (
    "active_experts",  # mean experts per real token
    "active_experts_max",  # the most experts any real token of the step was routed to
    "expected_k",  # mean sum_i pi_i
    "fallback_frac",  # tokens where no gate passed (fallback experts)
    "capped_frac",  # tokens cut to max_active
    "load_simpson",  # sum_e f_e^2 of the global load fractions f
    "effective_experts",  # 1 / load_simpson
    "max_load",  # busiest expert's load fraction x E (1 = uniform)
    "kl",
    "sparsity_penalty",
    "eval_active_experts",  # what the deterministic path would route for the same tokens
    "tau",
    "prior_scale",
    "balance_penalty",  # mean over forwards; reported only when the recipe has the term
    "count_bias",  # the count controller's c (0 without one)
    "load_bias_spread",  # max_i b_i - min_i b_i of the load controller (0 without one)
))

# Columns after the routing statistics and the per-expert load: per recording forward (one per
# micro-batch and rank) a 1, the schedule values, and (when computed) a 1 and the balance value.
SCHEDULE_COLUMNS = ("forwards", "tau", "prior_scale", "balance_forwards", "balance_penalty",
                    "count_bias", "load_bias_spread")


def routing_row_width(num_experts: int) -> int:
    """Length of one router's row: statistics (with histogram), load [E], schedule columns."""
    return routing_statistics_width(num_experts) + num_experts + len(SCHEDULE_COLUMNS)


def _columns(sums_LW: torch.Tensor, num_experts: int):
    S, E = len(STAT_SUMS), num_experts
    stats = {name: sums_LW[:, i] for i, name in enumerate(STAT_SUMS)}
    histogram_LK = sums_LW[:, S:S + E + 1]
    load_LE = sums_LW[:, S + E + 1:S + 2 * E + 1]
    sched = {name: sums_LW[:, S + 2 * E + 1 + i] for i, name in enumerate(SCHEDULE_COLUMNS)}
    return stats, histogram_LK, load_LE, sched


def routing_metrics(sums_LW: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The per-layer values of :data:`METRIC_NAMES`, [len(METRIC_NAMES), L] fp32, from summed
    rows [L, W] (computed on their device: no host sync). Layers without tokens read 0."""
    sums_LW = sums_LW.double()
    E = num_experts
    stats, histogram_LK, load_LE, sched = _columns(sums_LW, E)
    tokens_L = stats["tokens"].clamp(min=1.0)
    counts_K = torch.arange(E + 1, device=sums_LW.device, dtype=sums_LW.dtype)
    # The largest bin with a token in it: the true maximum over every token of every rank.
    max_active_L = ((histogram_LK > 0) * counts_K).amax(dim=-1)
    total_L = load_LE.sum(dim=-1)
    load_frac_LE = load_LE / total_L[:, None].clamp(min=1.0)
    simpson_L = (load_frac_LE * load_frac_LE).sum(dim=-1)
    effective_L = torch.where(total_L > 0, 1.0 / simpson_L.clamp(min=1e-12),
                              torch.zeros_like(simpson_L))
    forwards_L = sched["forwards"].clamp(min=1.0)
    values = torch.stack([
        stats["active_experts"] / tokens_L,
        max_active_L,
        stats["expected_k"] / tokens_L,
        stats["fallback"] / tokens_L,
        stats["capped"] / tokens_L,
        simpson_L,
        effective_L,
        load_frac_LE.amax(dim=-1) * E,
        stats["kl"] / tokens_L,
        stats["sparsity_penalty"] / tokens_L,
        stats["eval_active_experts"] / tokens_L,
        sched["tau"] / forwards_L,
        sched["prior_scale"] / forwards_L,
        sched["balance_penalty"] / sched["balance_forwards"].clamp(min=1.0),
        sched["count_bias"] / forwards_L,
        sched["load_bias_spread"] / forwards_L,
    ])
    return values.float()


def record_routing_row(row_W: torch.Tensor, layer_number: int, num_layers: int,
                       num_experts: int) -> None:
    """Add one router forward's row to Megatron's global MoE tracker, which becomes a
    :class:`DirMoEMetricsTracker` if it is not one yet (keeping what it recorded so far)."""
    tracker = get_moe_metrics_tracker()
    if not isinstance(tracker, DirMoEMetricsTracker):
        tracker = install_metrics_tracker(num_experts=num_experts)
    tracker.record_routing(row_W, layer_number, num_layers, num_experts)


class DirMoEMetricsTracker(MoEMetricsTracker):
    """Megatron's MoE metrics tracker that also reports the DirMoE routing metrics.

    ``num_experts``: give it on every rank of a run with DirMoE routers, so that ranks without a
    DirMoE layer (pipeline stages of dense layers) still join the one routing all-reduce of
    ``report(..., force_initialize=True)`` (what `megatron.training` passes); ranks that
    recorded a row know the width anyway.
    """

    def __init__(self, num_experts: Optional[int] = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self._routing: Optional[torch.Tensor] = None  # [layers, routing_row_width(E)] float64
        self.last_per_layer: Dict[str, torch.Tensor] = {}
        self.last_iteration: Optional[int] = None
        self._throughput = None

    # ------------------------------------------------------------------ recording
    def record_routing(self, row_W: torch.Tensor, layer_number: int, num_layers: int,
                       num_experts: int) -> None:
        """Add a router's row (see :func:`routing_row_width`) to layer `layer_number`
        (1-based, of `num_layers` including MTP layers)."""
        if layer_number is None:
            return
        self.num_experts = num_experts
        if self._routing is None or self._routing.shape != (num_layers, row_W.numel()):
            # float64: token counts of a whole step stay exact (fp32 is exact to 2**24 only).
            self._routing = torch.zeros(num_layers, row_W.numel(), dtype=torch.float64,
                                        device=row_W.device)
        self._routing[layer_number - 1] += row_W.detach()

    @property
    def routing_sums(self) -> Optional[torch.Tensor]:
        """This rank's rows since the last report or clear, summed per layer [L, W]; None
        before the first."""
        return self._routing

    def clear(self) -> None:
        super().clear()
        if self._routing is not None:
            self._routing.zero_()

    # ------------------------------------------------------------------ reporting
    def enable_throughput(self, meter, log_interval: int,
                          interval_seconds: Callable[[], float]) -> None:
        """Append tokens/s, TFLOP/s and MFU at the realised k to every ``log_interval``-th report
        (`megatron_dirmoe.throughput`); `interval_seconds` gives the wall time since the last
        log line. `megatron.training` calls ``report`` once per iteration."""
        self._throughput = (meter, log_interval, interval_seconds)

    def report(self, loss_scale, iteration, writer=None, wandb_writer=None,
               per_layer_logging: bool = False, force_initialize: bool = False,
               track_names=None, num_layers=None, mtp_num_layers=None, **kwargs) -> str:
        """Megatron's report of the names it tracks, plus the DirMoE routing metrics (one
        all-reduce and one device-to-host copy per call); clears both."""
        from megatron_dirmoe.throughput import log_throughput

        self.last_iteration = iteration
        routing_text = self._report_routing(iteration, writer, wandb_writer, per_layer_logging,
                                            force_initialize, num_layers, mtp_num_layers)
        text = super().report(loss_scale, iteration, writer=writer, wandb_writer=wandb_writer,
                              per_layer_logging=per_layer_logging,
                              force_initialize=force_initialize, track_names=track_names,
                              num_layers=num_layers, mtp_num_layers=mtp_num_layers, **kwargs)
        text = (text or "") + routing_text
        if self._throughput is not None:
            meter, log_interval, interval_seconds = self._throughput
            meter.add_step(self.last_per_layer.get("dirmoe/active_experts"))
            if iteration % log_interval == 0:
                speed = meter.report(interval_seconds())
                log_throughput(speed, iteration, writer, wandb_writer)
                text = text + (speed.format() if speed else "")
        return text

    def _report_routing(self, iteration, writer, wandb_writer, per_layer_logging,
                        force_initialize, num_layers, mtp_num_layers) -> str:
        import torch.distributed as dist

        self.last_per_layer = {}
        sums = self._routing
        if sums is None:
            # A rank without DirMoE layers still joins the collective the others make.
            if not (force_initialize and self.num_experts and num_layers):
                return ""
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            sums = torch.zeros(num_layers + (mtp_num_layers or 0),
                               routing_row_width(self.num_experts), dtype=torch.float64,
                               device=device)
        else:
            sums = sums.clone()
            self._routing.zero_()
        # The one collective: every rank's rows (its layers, its tokens) summed over all ranks.
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        stats, _, _, sched = _columns(sums, self.num_experts)
        present_L = torch.stack([stats["tokens"], sched["balance_forwards"]]).float()
        host = torch.cat([routing_metrics(sums, self.num_experts), present_L]).cpu()  # one sync
        values_NL, (tokens_L, balance_forwards_L) = host[:-2], host[-2:]
        layers = (tokens_L > 0).nonzero().flatten()
        if layers.numel() == 0:
            return ""
        names = [n for n in METRIC_NAMES
                 if n != "dirmoe/balance_penalty" or balance_forwards_L.sum() > 0]
        self.last_per_layer = {name: values_NL[METRIC_NAMES.index(name)] for name in names}
        scalars = {}
        for name, values_L in self.last_per_layer.items():
            per_layer = values_L[layers]
            scalars[name] = float(per_layer.max() if name == "dirmoe/active_experts_max"
                                  else per_layer.mean())
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, iteration)
        if wandb_writer is not None:
            wandb_writer.log(scalars, iteration)
        if per_layer_logging:
            for name, values_L in self.last_per_layer.items():
                for layer in layers.tolist():
                    tag, value = f"moe/{name}_layer_{layer}", float(values_L[layer])
                    if writer is not None:
                        writer.add_scalar(tag, value, iteration)
                    if wandb_writer is not None:
                        wandb_writer.log({tag: value}, iteration)
        return "".join(f" {name}: {value:.2f} |" for name, value in scalars.items())


def install_metrics_tracker(num_experts: Optional[int] = None) -> DirMoEMetricsTracker:
    """Make a :class:`DirMoEMetricsTracker` Megatron's global MoE tracker (idempotent; what the
    previous tracker recorded is kept). Give ``num_experts`` in runs with DirMoE routers (see
    the class)."""
    tracker = get_moe_metrics_tracker()
    if not isinstance(tracker, DirMoEMetricsTracker):
        previous = tracker
        tracker = DirMoEMetricsTracker(num_experts=num_experts)
        tracker._metrics.update(previous.metrics)
        set_moe_metrics_tracker(tracker)
    elif num_experts is not None:
        tracker.num_experts = num_experts
    return tracker


def routing_summary(per_layer: Dict[str, torch.Tensor], moe_layers: List[int]) -> List[dict]:
    """One dict per MoE layer (1-based layer numbers) from a tracker's per-layer values; none
    when the tracker holds no step (a run resumed at its last iteration trains nothing)."""
    if not per_layer:
        return []
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
    ("count_bias", "c"),
    ("load_bias_spread", "b_spread"),
)


# A layer whose every token took the fallback routes as a TopK router, not by its gates.
ALL_FALLBACK = 0.99


def format_routing_summary(rows: List[dict], target_k: int, num_experts: int) -> str:
    """A fixed-width table: realised active experts vs target k, expected k, effective experts,
    fallback/cap fractions, per MoE layer; then a note naming the layers whose every token took
    the fallback (measured after aux-loss variants: such a layer stays a TopK router for the
    rest of the run, and nothing else in the log says so)."""
    columns = [(key, title) for key, title in _SUMMARY_COLUMNS if any(key in r for r in rows)]
    head = f"{'layer':>5} " + " ".join(f"{title:>11}" for _, title in columns)
    lines = [f"routing summary (target k = {target_k}, experts = {num_experts})", head]
    for row in rows:
        cells = " ".join(
            f"{row[key]:>11.3f}" if key in row else f"{'-':>11}" for key, _ in columns
        )
        lines.append(f"{row['layer']:>5} {cells}")
    all_fallback = [row["layer"] for row in rows
                    if row.get("fallback_frac", 0.0) >= ALL_FALLBACK]
    if all_fallback:
        layers = ", ".join(str(layer) for layer in all_fallback)
        lines.append(
            f"  note: layer{'s' if len(all_fallback) > 1 else ''} {layers} sent every token to "
            "the top-k fallback: routed as a TopK router, not by the gates. Expected in the "
            "first steps; at the end of a run it means the gates never cleared their "
            "threshold (README, 'How to read fallback_frac')")
    return "\n".join(lines)
