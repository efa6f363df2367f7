"""`DirichletRouter`: the DirMoE router as a Megatron-Core `Router`.

The math lives in :mod:`megatron_dirmoe.routing`; this adapter only does Megatron plumbing:
the fp32 gating GEMM, schedules by iteration, attaching the KL, count and balance losses with
`MoEAuxLossAutoScaler`, padding masks, the z-loss hook, Megatron's optional load-balancing
loss (aux_loss), and metrics for Megatron's MoE tracker.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import warnings
from typing import Iterable, Optional

import torch

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_default_pg_collection,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import Router, TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dirmoe.config import FALLBACK_COUNTED, DirMoEConfig
from megatron_dirmoe.metrics import METRIC_NAMES, record_routing_row
from megatron_dirmoe.routing import (
    balance_penalty,
    firing_sums,
    route,
    routing_regularizers,
    routing_statistics,
    slab_heads,
    softplus_inverse,
    spike_bias_init,
)
from megatron_dirmoe.schedules import prior_scale_at, temperature_at

_WARNED_UNSTEPPED_CONTROL = False  # warn once per process
_WARNED_AUX_WITH_GATES = False  # warn once per process, not once per layer

__all__ = ["DirichletRouter", "set_router_iteration", "update_count_control",
           "iter_dirichlet_routers", "METRIC_NAMES",
           "ROUTING_NOISE_RNG", "ROUTING_NOISE_RNG_CPU", "seed_routing_noise", "reset_routing_noise",
           "routing_noise_seed", "routing_noise_rng"]

# METRIC_NAMES (re-exported here): the per-layer metrics the routers' rows give
# (`megatron_dirmoe.metrics`).


class DirichletRouter(Router):
    """DirMoE router: Bernoulli spike gates pick experts, a Dirichlet slab splits the weight.

    Built by Megatron's `MoELayer` as ``router(config=..., pg_collection=..., is_mtp_layer=...)``;
    DirMoE hyperparameters come in through ``dirmoe_config`` (bind it with
    ``functools.partial``, which :func:`megatron_dirmoe.specs.swap_router` does).

    ``forward(input [s, b, h], padding_mask [s, b] (True = padding))`` returns
    ``(probs [T, E] fp32, routing_map [T, E] bool)`` with 1..max_active experts per real token
    and none for padded tokens (they add no load and no loss).

    Parameters (fp32, replicated over TP and marked ``sequence_parallel`` like Megatron's router
    weight so their gradients are all-reduced): ``weight`` stacks the gate weights W_z [E, h] and
    the recipe's slab heads (none for the calibrated recipe's gate-logit slab, W_v [E, h] for a
    separate slab head, the alpha_hi and alpha_lo heads [2E, h] for the paper recipe) so every
    logit comes from one GEMM; ``spike_bias`` b_z [E]; ``slab_bias`` [2E] (paper recipe only).
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: Optional[ProcessGroupCollection] = None,
        dirmoe_config: Optional[DirMoEConfig] = None,
        is_mtp_layer: bool = False,
    ) -> None:
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        self.dirmoe_config = ((dirmoe_config or DirMoEConfig()).validate_for(config.num_moe_experts)
                              .calibrated_for(config.num_moe_experts))
        temperature_at(self.dirmoe_config, 0)  # fails at build time if the horizon is unset
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        num_experts, hidden = config.num_moe_experts, config.hidden_size
        self.max_active = self.dirmoe_config.max_active_for(num_experts)
        self.prior_ratio = self.dirmoe_config.prior_ratio_for(num_experts)
        self.iteration = 0
        # Megatron's optional gate bias is replaced by the spike bias; the softmax slab head has
        # no bias, the paper's alpha_hi/alpha_lo heads have one (their starting concentrations).
        self.bias = None
        self.slab_heads = slab_heads(self.dirmoe_config.slab)
        self.weight = torch.nn.Parameter(
            torch.empty((1 + self.slab_heads) * num_experts, hidden, dtype=torch.float32))
        self.spike_bias = torch.nn.Parameter(torch.empty(num_experts, dtype=torch.float32))
        self.slab_bias = (torch.nn.Parameter(torch.empty(2 * num_experts, dtype=torch.float32))
                          if self.dirmoe_config.slab == "gated" else None)
        # Routed (non-padded) tokens per expert since the last `pop_expert_load()`. A plain fp32
        # tensor rather than a buffer, so Megatron's Float16Module (which casts buffers to bf16)
        # cannot round the counts; it follows the logits' device at the first forward.
        self.expert_load = torch.zeros(num_experts, dtype=torch.float32)
        # The count controller (`DirMoEConfig.count_control_rate`): c [1], a persistent buffer so
        # checkpoints carry it (kept fp32 like Megatron's expert bias, which Float16Module would
        # otherwise round to bf16), and the (routed experts, real tokens) sums of this step's
        # training forwards, which `update_count_control` reduces once per optimizer step. No
        # buffer without a controller: checkpoints of such runs keep their key set.
        self.count_control_rate = self.dirmoe_config.effective_count_control_rate
        if self.count_control_rate > 0:
            self.register_buffer("count_bias", torch.zeros(1, dtype=torch.float32))
        else:
            self.count_bias = None
        self.count_sums = torch.zeros(2, dtype=torch.float32)
        # `DirMoEConfig.count_control_gain`: 0 steps c by the sign of the miss, > 0 in
        # proportion to it (resolved with E; a config never resolved steps by the sign).
        self.count_control_gain = self.dirmoe_config.count_control_gain or 0.0
        # `DirMoEConfig.count_control_on`: the share of its fallback experts that a token on the
        # fallback counts (all of them, none, or 3/4).
        self._fallback_counted = FALLBACK_COUNTED[self.dirmoe_config.count_control_on or "routed"]
        self._fallback_k = self.dirmoe_config.fallback_k
        # The load controller (`DirMoEConfig.load_control_rate`): b [E], the same kind of
        # buffer, and this step's routed tokens per expert; below a floor of 1 it only lifts
        # starved experts (`DirMoEConfig.load_control_floor`).
        self.load_control_rate = self.dirmoe_config.effective_load_control_rate
        self.load_control_floor = self.dirmoe_config.load_control_floor
        if self.load_control_rate > 0:
            self.register_buffer("load_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.load_bias = None
        self.load_sums = torch.zeros(num_experts, dtype=torch.float32)
        self._counting_since: Optional[int] = None  # iteration of the oldest unreduced count
        # The Switch-style load-balancing loss on the posterior mean (`DirMoEConfig.
        # aux_loss_scores`; with 'gates' on the normalised gate probabilities pi / sum(pi), as
        # TopKRouter applies it to sigmoid scores), with k = target_k: the router's own
        # (`DirMoEConfig.aux_loss_coeff`), or Megatron's (--moe-router-load-balancing-type
        # aux_loss --moe-aux-loss-coeff c) in its place when that is on.
        self.routing_type = config.moe_router_load_balancing_type
        self.topk = self.dirmoe_config.target_k
        megatron_aux_coeff = TopKRouter.get_aux_loss_coeff(self, "aux_loss")
        self.aux_loss_coeff = (megatron_aux_coeff if megatron_aux_coeff > 0
                               else self.dirmoe_config.aux_loss_coeff)
        for kind in ("seq_aux_loss", "global_aux_loss"):
            if TopKRouter.get_aux_loss_coeff(self, kind) > 0:
                raise ValueError(f"--moe-router-load-balancing-type {kind} is not supported by "
                                 "DirichletRouter; use aux_loss")
        global _WARNED_AUX_WITH_GATES
        if (self.aux_loss_coeff > 0 and self.dirmoe_config.routing_rule == "gate"
                and self.dirmoe_config.renormalize and not _WARNED_AUX_WITH_GATES
                and self.dirmoe_config.count_control_on == "routed"):
            # Measured (docs/ROUTER_COMPARISON.md, "Tried and dropped"): the Switch loss keeps
            # the gate logits under their threshold, every token of a layer falls back to its
            # top k, the routed count is then exactly k and the count controller never moves.
            _WARNED_AUX_WITH_GATES = True
            warnings.warn(
                "an aux loss (--dirmoe-aux-loss-coeff, or --moe-router-load-balancing-type "
                "aux_loss) next to DirMoE's gate routing (the default recipe at k >= 2) with the "
                "count controller on routed experts can stop the gates from routing: in the "
                "cpu-fine and cpu-fine-shared comparisons three of four layers sent every token to "
                "the top-k fallback (dirmoe/fallback_frac 1.0), i.e. routed as TopK routers, on pi "
                "and on the posterior mean alike. Add --dirmoe-count-control-on partial (the "
                "count controller then sees the fallback and hands the tokens back to the gates; "
                "the default wherever --dirmoe-aux-loss-coeff > 0) and watch "
                "dirmoe/fallback_frac",
                stacklevel=2)
        if config.moe_router_enable_expert_bias:
            # DirMoE has its own expert bias, stepped with the count controller in one
            # all-reduce; Megatron's would move a second bias on the same decision.
            raise ValueError("--moe-router-enable-expert-bias is not supported by "
                             "DirichletRouter: its own per-expert bias is "
                             "--dirmoe-load-control-rate (on by default for k >= 2)")
        cfg = self.dirmoe_config
        self._static_kwargs = dict(
            posterior_scale=cfg.posterior_scale,
            alpha_floor=cfg.alpha_floor,
            alpha_ceiling=cfg.alpha_ceiling,
            leak=cfg.leak,
            route_threshold=cfg.route_threshold,
            max_active=self.max_active,
            renormalize=cfg.renormalize,
            alpha_lo=cfg.alpha_lo,
            prior_ratio=self.prior_ratio,
            target_k=cfg.target_k,
            rule=cfg.routing_rule,
            fallback_k=cfg.fallback_k,
            slab=cfg.slab,
            count_on_sample=cfg.count_on_sample,
            unnormalized_weight=cfg.effective_unnormalized_weight,
            loss_scale_kl=cfg.recon_variance * cfg.kl_weight,
            loss_scale_sparsity=cfg.recon_variance * cfg.effective_count_weight,
            with_balance=cfg.recon_variance * cfg.effective_balance_weight > 0,
            # Without the aux loss nothing reads the scores: no per-step division for them.
            aux_scores=cfg.aux_loss_scores if self.aux_loss_coeff > 0 else "gates",
        )
        self.balance_scale = cfg.recon_variance * cfg.effective_balance_weight
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Initialise W_z, W_v with Megatron's init method and b_z = tau_0 * logit(k/E)."""
        if not hasattr(self, "spike_bias"):  # called by Router.__init__ before our params exist
            return super().reset_parameters()
        if self.config.perform_initialization:
            self.config.init_method(self.weight)
        cfg = self.dirmoe_config
        with torch.no_grad():
            self.spike_bias.fill_(
                spike_bias_init(cfg.target_k, self.num_experts, temperature_at(cfg, 0))
            )
            if self.slab_bias is not None:
                # alpha_hi(x), alpha_lo(x) start at the prior's alpha_hi, alpha_lo.
                alpha_hi = self.prior_ratio * cfg.alpha_lo
                self.slab_bias[: self.num_experts].fill_(softplus_inverse(alpha_hi))
                self.slab_bias[self.num_experts:].fill_(softplus_inverse(cfg.alpha_lo))
        params = [self.weight, self.spike_bias] + ([self.slab_bias] if self.slab_bias is not None
                                                   else [])
        for param in params:
            param.data = param.data.to(dtype=self.config.params_dtype)
            setattr(param, "sequence_parallel", self.config.sequence_parallel)

    # ------------------------------------------------------------------ schedules
    def set_iteration(self, iteration: int) -> None:
        """Tell the router the current training iteration (drives tau_z and lambda_p)."""
        self.iteration = int(iteration)
        global _WARNED_UNSTEPPED_CONTROL
        if (self._counting_since is not None and self.iteration > self._counting_since + 1
                and not _WARNED_UNSTEPPED_CONTROL):
            # A training loop of the user's own that never calls `update_count_control`: the
            # count and the load would drift unnoticed.
            _WARNED_UNSTEPPED_CONTROL = True
            warnings.warn("DirMoE's count controller has not been stepped for several "
                          "iterations: call megatron_dirmoe.update_count_control(model) after "
                          "every optimizer step (or set --dirmoe-count-control-rate 0 "
                          "--dirmoe-load-control-rate 0)", stacklevel=2)

    @property
    def temperature(self) -> float:
        """Current spike temperature tau_z."""
        return temperature_at(self.dirmoe_config, self.iteration)

    @property
    def prior_scale(self) -> float:
        """Current Dirichlet prior scale lambda_p."""
        return prior_scale_at(self.dirmoe_config, self.iteration)

    # ------------------------------------------------------------------ forward
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Every router logit [..., (1 + slab heads) E] in fp32 from one GEMM (device-agnostic,
        unlike `Router.gating`, which moves CPU weights to CUDA). Saves `input` in its own dtype
        (bf16 under mixed precision) for the backward, as Megatron's `router_gating_linear`
        does."""
        # Not Megatron's `router_gating_linear` itself: with TE 2.20 its TE GEMM path fails
        # (cuBLAS "unsupported value") for bf16 inputs and fp32 output on some shapes.
        return _GatingLinear.apply(input, self.weight)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route [T, (1 + slab heads) E] logits; returns (probs [T, E], routing_map [T, E])."""
        num_experts = self.num_experts
        logits = logits.view(-1, (1 + self.slab_heads) * num_experts)
        valid_T = None
        if padding_mask is not None:
            valid_T = ~padding_mask.reshape(-1)
        spike_logits, slab_logits = logits.split(
            [num_experts, self.slab_heads * num_experts], dim=-1)
        if self.slab_heads == 0:
            slab_logits = None
        # Megatron's optional z-loss (--moe-z-loss-coeff) regularises the spike logits. Its
        # implementation only touches state every Router has, so reuse it rather than copy it.
        spike_logits = TopKRouter.apply_z_loss(
            self, spike_logits, padding_mask=None if valid_T is None else ~valid_T
        )

        with_losses = self.training and torch.is_grad_enabled()
        tau, prior_scale = self.temperature, self.prior_scale
        # Schedules enter as 0-d tensors so the compiled step does not recompile as they move;
        # fill_ launches a kernel without a host-to-device copy. A fresh tensor per call:
        # autograd saves tau for the backward, so refilling one tensor in place would break a
        # second forward before the first backward (pipeline schedules).
        schedule_2 = torch.empty(2, dtype=torch.float32, device=logits.device)
        schedule_2.fill_(tau)[1].fill_(prior_scale)
        with self._noise_rng(spike_logits.device):
            probs, routing_map, loss_sum, stats, load_E, aux_scores, firing_2E = self._step_fn(
                spike_logits.device)(
                spike_logits,
                slab_logits,
                self.spike_bias,
                self.slab_bias,
                schedule_2[0],
                schedule_2[1],
                valid_T,
                training=self.training,
                with_losses=with_losses,
                route_bias=self._route_bias(),
                **self._static_kwargs,
            )
        if with_losses:
            # One count of real tokens (and the firing sums of the balance term) over the
            # TP x CP group serves every loss that needs it: at most one all-reduce per layer.
            num_tokens = balance = None
            if (self.aux_loss_coeff > 0 or self.balance_scale > 0
                    or not self.calculate_per_token_loss):
                with_balance = self.balance_scale > 0
                num_tokens, group_2E = self._group_token_sums(
                    firing_2E if with_balance else None, valid_T, probs.shape[0])
                if with_balance:
                    balance = self._balance_penalty(firing_2E, group_2E, num_tokens)
            probs = self._attach_losses(probs, loss_sum, num_tokens, balance)
            if self.aux_loss_coeff > 0:
                probs = self._apply_load_balancing_loss(probs, aux_scores, routing_map, valid_T,
                                                        num_tokens)
            # Only the forward that builds the graph records, as Megatron guards its own
            # router's statistics: under activation recompute the first forward runs without
            # grad and the re-forward with it, and evaluation passes are not training statistics.
            self._record_metrics(stats, load_E, schedule_2, balance)
            if self.count_bias is not None:
                if self.count_sums.device != stats.device:
                    self.count_sums = self.count_sums.to(stats.device)
                routed = stats[1]
                if self._fallback_counted < 1.0:
                    # A fallback token routes to exactly fallback_k experts that its gates
                    # did not choose: count only a share of them ('gates' 0, 'partial' 3/4).
                    routed = routed - (1.0 - self._fallback_counted) * self._fallback_k * stats[3]
                self.count_sums += torch.stack([routed, stats[0]]).float()  # (routed, tokens)
            if self.load_bias is not None:
                if self.load_sums.device != load_E.device:
                    self.load_sums = self.load_sums.to(load_E.device)
                self.load_sums += load_E.float()
            if self._counting_since is None and (self.count_bias is not None
                                                 or self.load_bias is not None):
                self._counting_since = self.iteration
        return probs, routing_map

    def _controller_buffers_fp32(self) -> None:
        """Keep c and b in fp32 (Megatron's Float16Module casts buffers to the model dtype)."""
        for name in ("count_bias", "load_bias"):
            buffer = getattr(self, name)
            if buffer is not None and buffer.dtype != torch.float32:
                buffer.data = buffer.data.float()

    def _route_bias(self) -> Optional[torch.Tensor]:
        """c + b, what the controllers add to the routing decision (None without either)."""
        self._controller_buffers_fp32()
        if self.load_bias is None:
            return self.count_bias
        if self.count_bias is None:
            return self.load_bias
        return self.count_bias + self.load_bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._controller_buffers_fp32()  # load c, b at full precision (bf16 would round them)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route `input` [s, b, h]; `padding_mask` [s, b] is True at padded tokens."""
        return self.routing(self.gating(input), padding_mask=padding_mask)

    def _noise_rng(self, device: torch.device):
        """Where this rank draws its Gumbel/Dirichlet noise (see `routing_noise_rng`).

        Ranks that route different tokens must not draw the same noise: data-parallel ranks
        (expert-parallel ranks among them: for attention and the router they are DP ranks),
        context-parallel ranks, and, under sequence parallelism, the TP ranks (each routes its
        own sequence shard, as Megatron's per-TP-rank stream serves dropout there). Ranks that
        route the same tokens must draw the same noise: without SP every TP rank routes the
        whole sequence and all of them must pick the same experts. So the stream is keyed by the
        global rank of this rank's TP group leader (without SP) or of this rank (with SP); the
        key also differs between pipeline stages, whose layers should not share noise either.
        With a single token shard (one DP x CP replica, no SP) the process's default generator
        is used as before: nothing to decorrelate, and every checkpoint format saves it.
        """
        if not self.training:
            return contextlib.nullcontext()
        tp_size = self.tp_group.size()
        sequence_parallel = self.config.sequence_parallel and tp_size > 1
        shards = self.tp_dp_cp_group.size() // (1 if sequence_parallel else tp_size)
        if shards == 1:
            return contextlib.nullcontext()
        stream = (torch.distributed.get_rank() if sequence_parallel
                  else torch.distributed.get_global_rank(self.tp_group, 0))
        return routing_noise_rng(device, stream)

    def _step_fn(self, device: torch.device):
        """The routing step, compiled on CUDA when `torch_compile` is on (eager otherwise)."""
        if device.type != "cuda" or not self.dirmoe_config.torch_compile:
            return _routing_step
        global _COMPILED_ROUTING_STEP
        if _COMPILED_ROUTING_STEP is None:
            _COMPILED_ROUTING_STEP = torch.compile(_routing_step, dynamic=False)
        return _COMPILED_ROUTING_STEP

    # ------------------------------------------------------------------ losses
    def _group_token_sums(self, sums, valid_T, num_local: int):
        """(real tokens, ``sums`` added over the group or None) of this micro-batch over the
        TP x CP group, the token shards of one data-parallel replica. One all-reduce when the
        group has several ranks and something is data-dependent (padding, or the sums), none
        otherwise; the count is a Python number without padding."""
        size = self.tp_cp_group.size()
        parts = []
        if sums is not None:
            parts.append(sums.detach().flatten())
        if valid_T is not None:
            parts.append(valid_T.sum().float().view(1))
        if not parts:
            return float(num_local * size), None
        stats = torch.cat(parts)
        if size > 1:
            torch.distributed.all_reduce(stats, group=self.tp_cp_group)
        num_tokens = (stats[-1].clamp(min=1.0) if valid_T is not None
                      else float(num_local * size))
        return num_tokens, (stats[:sums.numel()].view_as(sums) if sums is not None else None)

    def _balance_penalty(self, firing_2E, group_2E, num_tokens):
        """The aggregate spike prior on the gates' firing rates over the micro-batch's real
        tokens in this data-parallel replica.

        The rates are reduced over TP x CP, as Megatron's default aux loss reduces its token
        counts (`tp_cp_group`, in the router's forward): the value does not depend on how TP
        and CP split the tokens, and data-parallel replicas never wait for each other here.
        Each replica's term is that of its own micro-batch, like a gradient-accumulation
        micro-batch on one rank, so a run equals one rank that accumulates its replicas'
        micro-batches. The gradient flows through this rank's tokens only, scaled like the
        other losses (divided by the TP x CP token count): summed over TP x CP by Megatron,
        it is the gradient of the replica's term.
        """
        local_2E = firing_2E / num_tokens
        rates_2E = local_2E + (group_2E / num_tokens - local_2E).detach()
        return balance_penalty(rates_2E[0], rates_2E[1], self.dirmoe_config.target_k)

    def _attach_losses(self, probs, loss_sum, num_tokens, balance=None):
        """Attach sigma^2 * (beta * KL + lambda * penalty), averaged over real tokens, plus
        sigma^2 * beta_z * the balance penalty.

        Each TP/CP rank holds a shard of the tokens and the router gradients are summed over
        TP/CP, so each rank contributes its local sum divided by the *global* token count; the
        sum over ranks then equals the single-rank mean exactly.
        """
        if self.calculate_per_token_loss:
            # Megatron divides every gradient by the global token count later.
            aux = loss_sum
            if balance is not None:
                aux = aux + self.balance_scale * balance * num_tokens
        else:
            aux = loss_sum / num_tokens
            if balance is not None:
                aux = aux + self.balance_scale * balance
        if self.is_mtp_layer and self.config.mtp_use_repeated_layer and self.config.mtp_num_layers:
            aux = aux / self.config.mtp_num_layers
        return MoEAuxLossAutoScaler.apply(probs, aux)

    def _apply_load_balancing_loss(self, probs, aux_scores_TE, routing_map_TE, valid_T,
                                   num_tokens):
        """Megatron's aux_loss (Switch) on the normalised `aux_scores_TE` (pi, or the posterior
        mean: `DirMoEConfig.aux_loss_scores`) against the realised routed load."""
        coeff = self.aux_loss_coeff
        scores_TE = aux_scores_TE / aux_scores_TE.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        if valid_T is not None:
            scores_TE = scores_TE * valid_T[:, None]
        tokens_per_expert = reduce_from_tensor_model_parallel_region(
            routing_map_TE.sum(dim=0).float(), self.tp_cp_group
        )
        aux = switch_load_balancing_loss_func(
            probs=scores_TE, tokens_per_expert=tokens_per_expert, total_num_tokens=num_tokens,
            topk=self.topk, num_experts=self.num_experts, moe_aux_loss_coeff=coeff,
        )
        return TopKRouter.attach_and_log_load_balancing_loss(
            self, probs, coeff, aux, "load_balancing_loss", self.tp_cp_group,
            valid_token_count=None if valid_T is None else valid_T.sum(),
        )

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def _record_metrics(self, stats, load_E, schedule_2, balance=None) -> None:
        """Add this forward's row (`megatron_dirmoe.metrics.routing_row_width`) to the
        tracker: on the device, no collective, no host sync (the report reduces all layers'
        rows once per step)."""
        if self.expert_load.device != load_E.device:
            self.expert_load = self.expert_load.to(load_E.device)
        self.expert_load += load_E
        if self.layer_number is None:
            return
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer_number = self.layer_number + (self.config.num_layers if self.is_mtp_layer else 0)
        one = torch.ones(1, dtype=torch.float32, device=load_E.device)
        balance_2 = (torch.cat([one, balance.detach().float().view(1)]) if balance is not None
                     else torch.zeros(2, dtype=torch.float32, device=load_E.device))
        zero = torch.zeros(1, dtype=torch.float32, device=load_E.device)
        count_bias = (self.count_bias.detach().float().view(1) if self.count_bias is not None
                      else zero)
        load_spread = ((self.load_bias.amax() - self.load_bias.amin()).float().view(1)
                       if self.load_bias is not None else zero)
        row = torch.cat([stats.float(), load_E, one, schedule_2, balance_2,
                         count_bias, load_spread]).double()
        record_routing_row(row, layer_number, num_layers, self.num_experts)

    def pop_expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last call (local rank), then reset."""
        load = self.expert_load.clone()
        self.expert_load.zero_()
        return load


class _GatingLinear(torch.autograd.Function):
    """``input [..., h] @ weight [R, h].T`` in fp32, keeping the input in its own dtype for the
    backward: the fp32 copy of a bf16 input exists only inside forward and backward, so the
    router's saved activation is the bf16 input, as for Megatron's `TopKRouter` (plain
    ``F.linear(input.float(), ...)`` would save the fp32 copy: twice the memory)."""

    @staticmethod
    def forward(ctx, input, weight):
        ctx.save_for_backward(input, weight)
        return torch.nn.functional.linear(input.float(), weight.float())

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_output = grad_output.float()
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = (grad_output @ weight.float()).to(input.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_output.reshape(-1, grad_output.shape[-1]).t()
                           @ input.reshape(-1, input.shape[-1]).float()).to(weight.dtype)
        return grad_input, grad_weight


# ---------------------------------------------------------------------- routing-noise streams
# Megatron seeds its generators without the data-parallel rank (megatron.training: --seed plus
# 100 x the PP rank; the tracker's per-TP stream: plus 2718 + the TP rank), so drawing the
# routing noise from them gives every DP replica the same noise at the same token positions.
# The router draws from a dedicated stream instead whenever ranks route different tokens (see
# `DirichletRouter._noise_rng`), seeded from (base seed, stream key) so that a seed and a layout
# always reproduce the same draws.
#
# On CUDA the stream is a named state of Megatron's CUDA RNG tracker, so it behaves like the
# tracker's own streams: activation recompute restores it (identical noise in the re-forward),
# `megatron.training` saves it with the checkpoint, and the draws inside torch.compile'd code
# (which read the current device generator) follow the fork. Megatron saves the tracker states
# of DP rank 0 only (unless --data-parallel-random-init) and every DP rank loads those; a state
# whose seed is not this rank's is therefore re-keyed at the next draw: this rank's seed, the
# loaded Philox offset (equal on all DP ranks, which draw the same shapes), so a resumed run
# continues each rank's own stream exactly. On the CPU (no CUDA, e.g. gloo test ranks) the
# tracker cannot fork, so the stream's CPU generator state is swapped in around the draw here, as
# the tracker swaps CUDA states; it is kept in the tracker under its own name all the same, so
# recompute restores it too (a CPU state whose seed is not this rank's restarts the stream: CPU
# generators have no offset to keep).
ROUTING_NOISE_RNG = "dirmoe-routing-noise-rng"  # the tracker state's name (CUDA)
ROUTING_NOISE_RNG_CPU = ROUTING_NOISE_RNG + "-cpu"  # the same for routing on the CPU

_noise_base_seed: Optional[int] = None
_scratch_generators: dict[int, torch.Generator] = {}  # CUDA device index -> scratch generator


def seed_routing_noise(seed: int) -> None:
    """Set the base seed of the routing-noise streams (megatron.training's path passes
    ``--seed``). Without it the first draw takes ``torch.initial_seed()``, the seed this process
    last gave torch. The same seed again changes nothing; another one re-seeds each stream at its
    next draw."""
    global _noise_base_seed
    _noise_base_seed = int(seed)


def reset_routing_noise() -> None:
    """Forget the base seed and where every stream is: the next draw starts the streams afresh."""
    global _noise_base_seed
    _noise_base_seed = None
    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    if {ROUTING_NOISE_RNG, ROUTING_NOISE_RNG_CPU} & states.keys():
        states.pop(ROUTING_NOISE_RNG, None)
        states.pop(ROUTING_NOISE_RNG_CPU, None)
        tracker.set_states(states)


@functools.lru_cache(maxsize=None)  # asked on every routing call: hash once per stream
def routing_noise_seed(base_seed: int, stream: int) -> int:
    """The seed of stream `stream` (a global rank, see `DirichletRouter._noise_rng`): a hash, so
    that nearby base seeds and ranks never give overlapping seeds (as ``seed + rank`` would)."""
    digest = hashlib.blake2b(f"{int(base_seed)}/{int(stream)}".encode(), digest_size=8,
                             person=b"dirmoe-noise").digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: valid for every torch generator


def routing_noise_rng(device: torch.device, stream: int):
    """Context manager: inside it, torch's generator for `device` draws from routing-noise stream
    `stream` (its state is kept between calls); outside, the generators are untouched."""
    global _noise_base_seed
    if _noise_base_seed is None:
        _noise_base_seed = torch.initial_seed()
    seed = routing_noise_seed(_noise_base_seed, stream)
    device = torch.device(device)
    tracker = get_cuda_rng_tracker()
    if device.type != "cuda":
        return _cpu_noise_fork(tracker, seed)
    states = tracker.get_states()
    current = states.get(ROUTING_NOISE_RNG)
    state = _cuda_noise_state(current, seed, device, tracker, states)
    if state is not current:
        states[ROUTING_NOISE_RNG] = state
        tracker.set_states(states)
    return tracker.fork(ROUTING_NOISE_RNG)


@contextlib.contextmanager
def _cpu_noise_fork(tracker, seed: int):
    state = tracker.get_states().get(ROUTING_NOISE_RNG_CPU)
    if state is None or torch.Generator().set_state(state).initial_seed() != seed:
        state = torch.Generator().manual_seed(seed).get_state()
    outer = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        yield
    finally:
        states = tracker.get_states()
        states[ROUTING_NOISE_RNG_CPU] = torch.get_rng_state()
        tracker.set_states(states)
        torch.set_rng_state(outer)


def _cuda_noise_state(state, seed: int, device: torch.device, tracker, states: dict):
    """`state` (None: a new one) as a tracker state of the right kind seeded with `seed`; the
    same object when it already is, else a re-keyed one that keeps its Philox offset."""
    graph_safe = (isinstance(state, torch.Generator) if state is not None else
                  getattr(tracker, "use_cudagraphable_rng", False)
                  or any(isinstance(s, torch.Generator) for s in states.values()))
    index = device.index if device.index is not None else torch.cuda.current_device()
    if graph_safe:  # the tracker keeps generator objects (CUDA-graph-safe RNG)
        if state is None:
            state = torch.cuda.default_generators[index].clone_state()
            state.manual_seed(seed)
        elif state.initial_seed() != seed:
            offset = state.get_offset()
            state = state.clone_state()  # the loaded object may be shared: leave it as it is
            state.manual_seed(seed)
            state.set_offset(offset)
        return state
    scratch = _scratch_generators.get(index)
    if scratch is None:
        scratch = _scratch_generators[index] = torch.Generator(device=torch.device("cuda", index))
    if state is None:
        scratch.manual_seed(seed)
        return scratch.get_state()
    scratch.set_state(state)
    if scratch.initial_seed() == seed:
        return state
    offset = scratch.get_offset()
    scratch.manual_seed(seed)
    scratch.set_offset(offset)
    return scratch.get_state()


# ---------------------------------------------------------------------- the routing step
_COMPILED_ROUTING_STEP = None


def _routing_step(
    spike_logits_TE,
    slab_logits_TE,
    spike_bias_E,
    slab_bias_S,
    tau,
    prior_scale,
    valid_T,
    *,
    training: bool,
    with_losses: bool,
    posterior_scale: float,
    alpha_floor: float,
    alpha_ceiling: float,
    leak: float,
    route_threshold: float,
    max_active: int,
    renormalize: bool,
    alpha_lo: float,
    prior_ratio: float,
    target_k: int,
    rule: str,
    fallback_k: int,
    slab: str,
    count_on_sample: bool,
    loss_scale_kl: float,
    loss_scale_sparsity: float,
    with_balance: bool = True,
    route_bias: Optional[torch.Tensor] = None,
    unnormalized_weight: str = "posterior-mean",
    aux_scores: str = "gates",
):
    """Everything the router computes per step, as one function of tensors (so torch.compile
    can fuse it on CUDA): routing, padding, the summed regulariser, statistics, and the scores
    of Megatron's aux loss before normalisation (`aux_scores`: pi, or the posterior's alpha_q)."""
    result = route(
        spike_logits_TE,
        slab_logits_TE,
        spike_bias_E,
        tau=tau,
        posterior_scale=posterior_scale,
        alpha_floor=alpha_floor,
        alpha_ceiling=alpha_ceiling,
        leak=leak,
        route_threshold=route_threshold,
        max_active=max_active,
        renormalize=renormalize,
        training=training,
        rule=rule,
        fallback_k=fallback_k,
        slab=slab,
        slab_bias_S=slab_bias_S,
        route_bias=route_bias,
        unnormalized_weight=unnormalized_weight,
    )
    probs_TE, routing_map_TE = result.probs_TE, result.routing_map_TE
    if valid_T is not None:
        # Padded tokens go to no expert: they add no load and no loss.
        routing_map_TE = routing_map_TE & valid_T[:, None]
        probs_TE = probs_TE * valid_T[:, None]
    loss_sum = kl_T = sparsity_T = firing_2E = None
    if with_losses:
        kl_T, sparsity_T = routing_regularizers(
            result,
            prior_scale=prior_scale,
            alpha_lo=alpha_lo,
            prior_ratio=prior_ratio,
            alpha_floor=alpha_floor,
            alpha_ceiling=alpha_ceiling,
            target_k=target_k,
            rule=rule,
            count_on_sample=count_on_sample,
        )
        per_token_T = loss_scale_kl * kl_T + loss_scale_sparsity * sparsity_T
        if valid_T is not None:
            per_token_T = per_token_T * valid_T
        loss_sum = per_token_T.sum()
        # The firing sums feed only the balance term (none in the paper recipes).
        firing_2E = firing_sums(result.logits_TE, tau, valid_T) if with_balance else None
        # Statistics are recorded only by the forward that builds the graph (see `routing`):
        # evaluation and the no-grad first pass of activation recompute skip them.
        stats, load_E = routing_statistics(
            result,
            routing_map_TE,
            valid_T,
            kl_T,
            sparsity_T,
            route_threshold=route_threshold,
            leak=leak,
            max_active=max_active,
            rule=rule,
        )
    else:
        stats = load_E = None
    # Unnormalised: the aux loss normalises either kind once (`_apply_load_balancing_loss`).
    scores_TE = result.gate_prob_TE if aux_scores == "gates" else result.alpha_q_TE
    return probs_TE, routing_map_TE, loss_sum, stats, load_E, scores_TE, firing_2E


# ---------------------------------------------------------------------- helpers
def iter_dirichlet_routers(model) -> Iterable[DirichletRouter]:
    """Every `DirichletRouter` in a model or a list of model chunks."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, DirichletRouter):
                yield module


def update_count_control(model) -> int:
    """One step of every routing controller in `model` (a module or a list of chunks).

    The count controller's c moves by +-rate towards a mean of k routed experts per token (in
    proportion to the miss below a miss of k / `count_control_gain`, where that gain is > 0), and
    the load controller's b_i by +-rate towards the mean expert's routed tokens (up for an
    expert below it, down above), both over this step's training forwards summed over the
    tensor-, data- and context-parallel ranks: one all-reduce for all layers and both
    controllers. Every rank of that group must call this once per optimizer step, as Megatron
    calls `finalize_model_grads`. A router that saw no tokens keeps its biases. Returns the
    number of routers stepped."""
    routers = [r for r in iter_dirichlet_routers(model) if r.training
               and (r.count_bias is not None or r.load_bias is not None)]
    if not routers:
        return 0
    with torch.no_grad():
        first = routers[0]
        device = (first.count_bias if first.count_bias is not None else first.load_bias).device
        # One flat vector: per router its (routed, tokens) sums, then its per-expert loads.
        pieces = []
        for router in routers:
            if router.count_bias is not None:
                pieces.append(router.count_sums.to(device))
            if router.load_bias is not None:
                pieces.append(router.load_sums.to(device))
        flat = torch.cat(pieces)
        group = first.tp_dp_cp_group
        if (torch.distributed.is_available() and torch.distributed.is_initialized()
                and group is not None and group.size() > 1):
            torch.distributed.all_reduce(flat, group=group)
        # Sign rules: a fixed step whatever the size of the miss (so a burst of undecided gates
        # early in training cannot wind a bias up), and none without tokens (sign(0) = 0); the
        # count's proportional step is capped at the same size. No host synchronisation.
        offset = 0
        for router in routers:
            router._controller_buffers_fp32()
            if router.count_bias is not None:
                routed, tokens = flat[offset], flat[offset + 1]
                offset += 2
                wanted = router.dirmoe_config.target_k * tokens
                if router.count_control_gain > 0:
                    step = (router.count_control_gain * (wanted - routed)
                            / wanted.clamp(min=1.0)).clamp(-1.0, 1.0)
                else:
                    step = torch.sign(wanted - routed)
                router.count_bias.add_(step * router.count_control_rate)
                router.count_sums.zero_()
            if router.load_bias is not None:
                load_E = flat[offset:offset + router.num_experts]
                offset += router.num_experts
                router.load_bias.add_(torch.sign(router.load_control_floor * load_E.mean()
                                                 - load_E) * router.load_control_rate)
                if router.load_control_floor < 1.0:
                    # A floor only: b never pushes an expert below its gates' own choice.
                    router.load_bias.clamp_(min=0.0)
                router.load_sums.zero_()
            router._counting_since = None
    return len(routers)


def set_router_iteration(model, iteration: int) -> int:
    """Set the schedule iteration of every DirMoE router in `model` (a module or a list of
    chunks). Call once per training step; returns how many routers were updated."""
    count = 0
    for router in iter_dirichlet_routers(model):
        router.set_iteration(iteration)
        count += 1
    return count
