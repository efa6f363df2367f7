"""Training throughput at the *realised* number of active experts: tokens/s, TFLOP/s, MFU.

Megatron's own estimate (``megatron.training.training.num_floating_point_operations``) charges
every MoE layer ``--moe-router-topk`` experts per token. For DirMoE that flag is the per-token cap
``max_active`` (4k by default), so at k = 1 it overstates the expert FLOPs about 4x. Here the
expert term uses the mean number of experts the routers actually activated over the logging
interval (``dirmoe/active_experts``), per MoE layer.

Model FLOPs per token, forward pass, counting a multiply-add as 2 FLOPs (``n`` heads of size
``d``, ``g`` key/value groups, hidden ``h``, sequence ``s``, vocabulary ``V``)::

    attention  = 4 h d (n + g)                QKV and output projections
               + 2 s n d                      QK^T and AV under the causal mask (half of 4 s n d)
    dense MLP  = 2 h f m                      m = 3 with SwiGLU (gate, up, down), else 2
    MoE layer  = 2 h R                        router GEMM: R = (1 + slab heads) E for DirMoE (E for
                                             the default gate-logit slab, 3E for the paper
                                             recipe, 2E for paper-notes), E for top-k
               + k_l * 2 h f_moe m            k_l = realised active experts per token, layer l
               + 2 h f_shared m               shared expert, if any
    logits     = 2 h V

Training FLOPs per token = 3 x forward (the backward pass costs twice the forward). Activation
recompute is not counted: this is *model* FLOPs utilisation (MFU), as in PaLM and Megatron's
papers, not hardware FLOPs. Then::

    tokens/s        = global batch x seq length x iterations / wall seconds of the interval
    TFLOP/s/device  = tokens/s x training FLOPs per token / devices / 1e12
    MFU             = TFLOP/s/device / peak dense bf16 TFLOP/s of the device

The peak comes from ``--dirmoe-peak-tflops`` or, on a known GPU, from :data:`PEAK_BF16_TFLOPS`;
without either (e.g. on a CPU) MFU is not reported.

Pure Python: no torch, no Megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_dirmoe.layout import moe_layer_numbers

__all__ = ["PEAK_BF16_TFLOPS", "peak_tflops_for", "forward_flops_per_token",
           "training_flops_per_token", "ThroughputMeter", "Throughput", "meter_for_run",
           "log_throughput"]

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, in TFLOP/s, matched
# by substring of torch.cuda.get_device_name(); most specific first.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),   # SXM
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_tflops_for(device_name: Optional[str]) -> Optional[float]:
    """The dense bf16 peak of a GPU by name (None when unknown)."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def _get(args: Any, name: str, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


def _router_rows(args: Any, experts: int) -> int:
    """Rows of the router's gating weight: E for top-k; for DirMoE the gate head plus the
    recipe's slab heads (`routing.slab_heads`), read from the resolved ``args.dirmoe_config``
    (the default recipe's when absent)."""
    if getattr(args, "dirmoe_router", "dirichlet") != "dirichlet":
        return experts
    from megatron_dirmoe.config import DirMoEConfig
    from megatron_dirmoe.routing import slab_heads

    stored = getattr(args, "dirmoe_config", None) or {}
    slab = DirMoEConfig.slab_of(stored.get("recipe", "calibrated"),
                                stored.get("slab_mean", "gate"))
    return (1 + slab_heads(slab)) * experts


def forward_flops_per_token(args: Any, active_experts: Sequence[float]) -> float:
    """Forward FLOPs per token of the GPT that Megatron's ``args`` describe, with
    ``active_experts[i]`` experts per token in the i-th MoE layer (see the module docstring)."""
    h = args.hidden_size
    n = args.num_attention_heads
    d = _get(args, "kv_channels", h // n)
    g = args.num_query_groups if getattr(args, "group_query_attention", False) else n
    s = args.seq_length
    m = 3 if getattr(args, "swiglu", False) else 2
    vocab = _get(args, "padded_vocab_size", _get(args, "vocab_size", 0))
    layers = args.num_layers
    moe_layers = moe_layer_numbers(args.moe_layer_freq, layers) if args.num_experts else []
    if len(active_experts) != len(moe_layers):
        raise ValueError(f"{len(active_experts)} active-expert counts for {len(moe_layers)} MoE "
                         "layers")
    attention = 4 * h * d * (n + g) + 2 * s * n * d
    dense_mlp = 2 * h * _get(args, "ffn_hidden_size", 4 * h) * m
    flops = layers * attention + (layers - len(moe_layers)) * dense_mlp + 2 * h * vocab
    if moe_layers:
        experts = args.num_experts
        router_rows = _router_rows(args, experts)
        f_moe = _get(args, "moe_ffn_hidden_size", _get(args, "ffn_hidden_size", 4 * h))
        shared = _get(args, "moe_shared_expert_intermediate_size", 0)
        per_layer = 2 * h * router_rows + 2 * h * shared * m
        flops += len(moe_layers) * per_layer + sum(active_experts) * 2 * h * f_moe * m
    return float(flops)


def training_flops_per_token(args: Any, active_experts: Sequence[float]) -> float:
    """Model FLOPs per token of one training step (forward + backward = 3 x forward)."""
    return 3.0 * forward_flops_per_token(args, active_experts)


@dataclass
class Throughput:
    """One logging interval's numbers."""

    tokens_per_s: float
    tflops_per_device: float
    mfu: Optional[float]          # fraction of the peak; None without a peak
    active_experts: float         # realised experts per token, mean over MoE layers

    def format(self) -> str:
        mfu = "n/a" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        return (f" tokens/s {self.tokens_per_s:,.0f} | TFLOP/s/device "
                f"{self.tflops_per_device:.4g} (k={self.active_experts:.2f}) | MFU {mfu} |")


class ThroughputMeter:
    """Accumulates iterations, tokens and realised experts per token between log lines.

    ``add(iterations, active_per_layer)`` after each step (``active_per_layer``: mean experts
    per token of each MoE layer in that step, or None to use ``fixed_active``);
    ``report(seconds)`` returns the interval's :class:`Throughput` and starts a new interval.
    """

    def __init__(self, args: Any, *, devices: int = 1, peak_tflops: Optional[float] = None,
                 fixed_active: Optional[float] = None) -> None:
        self.args = args
        self.devices = max(1, int(devices))
        self.peak_tflops = peak_tflops
        self.moe_layers = (moe_layer_numbers(args.moe_layer_freq, args.num_layers)
                           if args.num_experts else [])
        self.num_moe_layers = len(self.moe_layers)
        self.fixed_active = fixed_active
        self.tokens_per_iteration = args.global_batch_size * args.seq_length
        self._reset()

    def _reset(self) -> None:
        self.iterations = 0
        self._active_sum = [0.0] * self.num_moe_layers

    def add(self, iterations: int = 1, active_per_layer: Optional[Sequence[float]] = None) -> None:
        if active_per_layer is None:
            active_per_layer = [self.fixed_active or 0.0] * self.num_moe_layers
        if len(active_per_layer) != self.num_moe_layers:
            raise ValueError(f"{len(active_per_layer)} values for {self.num_moe_layers} MoE "
                             "layers")
        for i, value in enumerate(active_per_layer):
            self._active_sum[i] += float(value) * iterations
        self.iterations += iterations

    def add_step(self, active_by_layer=None) -> None:
        """One step, from the tracker's per-layer ``dirmoe/active_experts`` (indexed by layer
        number - 1, dense layers included); ``fixed_active`` when set or when None."""
        self.add(1, None if self.fixed_active is not None or active_by_layer is None
                 else [float(active_by_layer[n - 1]) for n in self.moe_layers])

    def report(self, seconds: float) -> Optional[Throughput]:
        """The interval's throughput (None when no iteration was added); resets the interval."""
        if self.iterations == 0 or seconds <= 0:
            self._reset()
            return None
        active = [a / self.iterations for a in self._active_sum]
        tokens_per_s = self.iterations * self.tokens_per_iteration / seconds
        tflops = tokens_per_s * training_flops_per_token(self.args, active) / self.devices / 1e12
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        mean_active = sum(active) / len(active) if active else 0.0
        self._reset()
        return Throughput(tokens_per_s, tflops, mfu, mean_active)


def meter_for_run(args: Any, *, devices: int = 1,
                  device_name: Optional[str] = None) -> ThroughputMeter:
    """The meter of a training run: the peak from ``--dirmoe-peak-tflops`` or the device's name,
    and ``--moe-router-topk`` experts per token for the top-k baseline."""
    return ThroughputMeter(
        args, devices=devices,
        peak_tflops=getattr(args, "dirmoe_peak_tflops", None) or peak_tflops_for(device_name),
        fixed_active=None if args.dirmoe_router == "dirichlet" else args.moe_router_topk)


def log_throughput(speed: Optional[Throughput], iteration: int, writer=None,
                   wandb_writer=None) -> None:
    """Write an interval's numbers to TensorBoard / W&B under ``throughput/*``."""
    if speed is None:
        return
    values = {"throughput/tokens_per_sec": speed.tokens_per_s,
              "throughput/tflops_per_device": speed.tflops_per_device,
              "throughput/active_experts": speed.active_experts}
    if speed.mfu is not None:
        values["throughput/mfu"] = speed.mfu
    if writer is not None:
        for name, value in values.items():
            writer.add_scalar(name, value, iteration)
    if wandb_writer is not None:
        wandb_writer.log(values, iteration)
