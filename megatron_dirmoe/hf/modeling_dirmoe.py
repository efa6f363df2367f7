"""Hugging Face `transformers` implementation of a Megatron GPT with DirMoE layers.

Same architecture as `megatron_dirmoe.model.build_gpt_model` (pre-norm decoder, RMSNorm or
LayerNorm, RoPE, GQA, gated or plain MLP, MoE layers at `config.moe_layers`, optional shared
expert) with the DirMoE router's deterministic evaluation path (`routing.route(training=False)`).
The routing math is not re-implemented here: it is imported from `dirmoe_routing`, which is
`megatron_dirmoe/routing.py` (re-exported inside the package, copied verbatim into exported
folders), so training and inference cannot drift apart.

The model plugs into transformers' own seams, as its MoE models (Mixtral, Qwen3-MoE) do, so the
fast paths and the serving engines' Transformers backends work with it:
- attention goes through `ALL_ATTENTION_FUNCTIONS` (``attn_implementation`` = "eager", "sdpa",
  "flex_attention", "flash_attention_2", or a serving engine's own), with masks from
  `transformers.masking_utils.create_causal_mask`;
- routed experts are one module of packed 3-D weights (`gate_up_proj` [E, 2F, D] = [gate; up],
  `down_proj` [E, D, F]) with the standard ``experts(hidden, top_k_index, top_k_weights)``
  forward behind `@use_experts_implementation` (``experts_implementation`` = "eager",
  "grouped_mm", "batched_mm", ...). DirMoE routes a variable number of experts per token; every
  token is padded to `max_active` slots (`config.num_experts_per_tok`) with weight 0 on a padded
  slot, whose index repeats the token's first expert (an index every kernel accepts, see
  `_fixed_width_top_k`).

Exported next to converted checkpoints: imports nothing but `torch` and `transformers`
(>= 5.16.1: the attention-interface lookup, `create_causal_mask` and the experts decorator in
the form used here).

Shape suffixes: B batch, S query length, K key length (past + S), D hidden, H heads,
G key/value heads, d head dim, T tokens (B * S), E experts, M max_active, F expert ffn, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as _init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dirmoe import DirMoEHFConfig
from .dirmoe_routing import route

__all__ = ["DirMoEModel", "DirMoEForCausalLM", "DirMoEPreTrainedModel"]

# The name under which the installed transformers passes the KV cache to `forward` and reads it
# back from the model outputs: the field of its own output classes ("cache" in current releases,
# "past_key_values" in earlier ones). `forward` accepts both names.
CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    else "past_key_values"
)


def _one_cache(cache: Optional[Cache], past_key_values: Optional[Cache]) -> Optional[Cache]:
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once, as `cache` (or its older name `past_key_values`)")
    return cache if cache is not None else past_key_values


def _norm(config: DirMoEHFConfig, size: int) -> nn.Module:
    """torch's LayerNorm / RMSNorm, exactly what Megatron's local spec (`TorchNorm`) builds."""
    if config.normalization == "LayerNorm":
        return nn.LayerNorm(size, eps=config.norm_eps)
    return nn.RMSNorm(size, eps=config.norm_eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DirMoERotaryEmbedding(nn.Module):
    """Non-interleaved RoPE over the full head dim (Megatron's `RotaryEmbedding` with
    rotary_percent 1). Frequencies are recomputed per call in fp32 (no buffer: the model can be
    built on the meta device)."""

    def __init__(self, config: DirMoEHFConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta

    def forward(self, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=position_ids_BS.device)
        inv_freq = 1.0 / (self.base ** (exponent / self.dim))
        freqs_BSf = position_ids_BS.float()[..., None] * inv_freq
        emb_BSd = torch.cat((freqs_BSf, freqs_BSf), dim=-1)
        return emb_BSd.cos(), emb_BSd.sin()


def eager_attention_forward(
    module: nn.Module,
    query_BHSd: torch.Tensor,
    key_BGKd: torch.Tensor,
    value_BGKd: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in plain torch ops, the "eager" entry of the interface. `attention_mask` is what
    `create_causal_mask` builds for "eager": additive [B, 1, S, K] (0 = attend, dtype min = not).
    Returns (output [B, S, H, d], probabilities [B, H, S, K])."""
    groups = module.num_key_value_groups
    key_BHKd = key_BGKd.repeat_interleave(groups, dim=1)
    value_BHKd = value_BGKd.repeat_interleave(groups, dim=1)
    scores_BHSK = torch.matmul(query_BHSd, key_BHKd.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores_BHSK = scores_BHSK + attention_mask[..., : key_BHKd.shape[-2]]
    probs_BHSK = torch.softmax(scores_BHSK, dim=-1, dtype=torch.float32).to(query_BHSd.dtype)
    probs_BHSK = F.dropout(probs_BHSK, p=dropout, training=module.training)
    out_BHSd = torch.matmul(probs_BHSK, value_BHKd)
    return out_BHSd.transpose(1, 2).contiguous(), probs_BHSK


class DirMoEAttention(nn.Module):
    """Causal self-attention with GQA, optional QK norm and RoPE (Megatron `SelfAttention`); the
    attention itself is whatever `config._attn_implementation` names."""

    def __init__(self, config: DirMoEHFConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = 0.0  # Megatron's --attention-dropout is a training setting
        self.is_causal = True
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if config.qk_layernorm:
            self.q_norm = _norm(config, self.head_dim)
            self.k_norm = _norm(config, self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, S, _ = hidden_states.shape
        # 1. Projections to heads: [B, heads, S, d].
        q_BHSd = self.q_proj(hidden_states).view(B, S, -1, self.head_dim).transpose(1, 2)
        k_BGSd = self.k_proj(hidden_states).view(B, S, -1, self.head_dim).transpose(1, 2)
        v_BGSd = self.v_proj(hidden_states).view(B, S, -1, self.head_dim).transpose(1, 2)
        # 2. QK norm (per head, before RoPE, as Megatron).
        if self.config.qk_layernorm:
            q_BHSd, k_BGSd = self.q_norm(q_BHSd), self.k_norm(k_BGSd)
        # 3. RoPE (cos/sin in fp32 cast to the activation dtype, as Megatron).
        cos_B1Sd, sin_B1Sd = (t[:, None].to(q_BHSd.dtype) for t in position_embeddings)
        q_BHSd = q_BHSd * cos_B1Sd + _rotate_half(q_BHSd) * sin_B1Sd
        k_BGSd = k_BGSd * cos_B1Sd + _rotate_half(k_BGSd) * sin_B1Sd
        # 4. KV cache: append this step's keys/values, attend over all of them.
        if past_key_values is not None:
            k_BGSd, v_BGSd = past_key_values.update(k_BGSd, v_BGSd, self.layer_idx)
        # 5. Attention through transformers' interface (or a serving engine's registered one).
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q_BHSd,
            k_BGSd,
            v_BGSd,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        # Implementations return [B, S, H, d] (or, in a serving engine, [T, H * d]).
        return self.o_proj(out.reshape(B, S, -1).contiguous()), weights


class DirMoEMLP(nn.Module):
    """Megatron `MLP`: fc1 = [gate; up] when gated (act(gate) * up), fc2 = down."""

    def __init__(self, config: DirMoEHFConfig, intermediate_size: int):
        super().__init__()
        hidden = config.hidden_size
        if config.gated_linear_unit:
            self.gate_proj = nn.Linear(hidden, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


def _eager_experts(experts: nn.Module, x_TD: torch.Tensor, top_k_index_TM: torch.Tensor,
                   top_k_weights_TM: torch.Tensor, project_in: Callable) -> torch.Tensor:
    """The eager experts loop: one GEMM pair per expert that holds at least one (token, slot)
    with a non-zero weight. Zero-weight (padded) slots cost nothing here; `project_in(e, x)`
    gives expert e's activation input to the down projection."""
    out_TD = torch.zeros_like(x_TD)
    with torch.no_grad():
        # [E, M, T] hit mask over real slots only.
        hit_EMT = F.one_hot(top_k_index_TM, experts.num_experts).permute(2, 1, 0)
        hit_EMT = hit_EMT * (top_k_weights_TM != 0).T[None]
        experts_hit = hit_EMT.sum(dim=(1, 2)).nonzero().flatten().tolist()
    for e in experts_hit:
        slot, token = torch.where(hit_EMT[e])
        y_TD = F.linear(project_in(e, x_TD[token]), experts.down_proj[e])
        y_TD = y_TD * top_k_weights_TM[token, slot, None]
        out_TD.index_add_(0, token, y_TD.to(out_TD.dtype))
    return out_TD


def _init_packed_experts(module: nn.Module, config: DirMoEHFConfig) -> None:
    """What both packed-expert layouts share: sizes, `down_proj` [E, D, F], the activation."""
    module.num_experts = config.num_experts
    module.hidden_dim = config.hidden_size
    module.intermediate_dim = config.moe_intermediate_size
    module.down_proj = nn.Parameter(
        torch.empty(config.num_experts, config.hidden_size, config.moe_intermediate_size))
    module.act_fn = ACT2FN[config.hidden_act]


@use_experts_implementation
class DirMoEExperts(nn.Module):
    """Routed SwiGLU-style experts as packed 3-D weights: `gate_up_proj` [E, 2F, D] holds each
    expert's Megatron `linear_fc1` ([gate; up]), `down_proj` [E, D, F] its `linear_fc2`.
    ``forward(x [T, D], top_k_index [T, M], top_k_weights [T, M]) -> [T, D]`` is the eager
    implementation; transformers swaps in its fused ones (`experts_implementation`)."""

    def __init__(self, config: DirMoEHFConfig):
        super().__init__()
        _init_packed_experts(self, config)
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        def project_in(e, x_ND):
            gate_NF, up_NF = F.linear(x_ND, self.gate_up_proj[e]).chunk(2, dim=-1)
            return self.act_fn(gate_NF) * up_NF

        return _eager_experts(self, hidden_states, top_k_index, top_k_weights, project_in)


@use_experts_implementation(has_gate=False)
class DirMoEUngatedExperts(nn.Module):
    """Routed experts without a gate (Megatron without --swiglu): `up_proj` [E, F, D] and
    `down_proj` [E, D, F]; the expert computes down(act(up(x)))."""

    def __init__(self, config: DirMoEHFConfig):
        super().__init__()
        _init_packed_experts(self, config)
        self.up_proj = nn.Parameter(
            torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        def project_in(e, x_ND):
            return self.act_fn(F.linear(x_ND, self.up_proj[e]))

        return _eager_experts(self, hidden_states, top_k_index, top_k_weights, project_in)


class DirMoERouter(nn.Module):
    """DirMoE router, evaluation path only: the logits of every router head from one fp32 GEMM on
    the stacked weight (as in Megatron: the spike head W_z, then the slab's heads,
    `config.router_logit_heads` x E rows), then `route(training=False)`. ``slab_bias`` [2E] (the
    paper's alpha_hi/alpha_lo heads, `router_slab="gated"`) only where the slab has one."""

    def __init__(self, config: DirMoEHFConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(
            torch.empty(config.router_logit_heads * config.num_experts, config.hidden_size))
        self.spike_bias = nn.Parameter(torch.empty(config.num_experts))
        self.slab_bias = (nn.Parameter(torch.empty(2 * config.num_experts))
                          if config.router_slab == "gated" else None)
        self.route_kwargs = dict(
            tau=config.router_tau,
            posterior_scale=config.router_posterior_scale,
            alpha_floor=config.router_alpha_floor,
            alpha_ceiling=config.router_alpha_ceiling,
            leak=config.router_leak,
            route_threshold=config.router_threshold,
            max_active=config.router_max_active,
            renormalize=config.router_renormalize,
            rule=config.router_rule,
            fallback_k=config.router_fallback_k,
            slab=config.router_slab,
            unnormalized_weight=config.router_unnormalized_weight,
            training=False,
        )

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (probs [T, E] fp32, zero off the active set; routing map [T, E] bool)."""
        logits_TnE = F.linear(x_TD.float(), self.weight.float())
        # Heads in the order Megatron stacks them: spike (which experts), then the slab's.
        spike_TE, slab_TS = logits_TnE[:, :self.num_experts], logits_TnE[:, self.num_experts:]
        slab_bias = None if self.slab_bias is None else self.slab_bias.float()
        result = route(spike_TE, slab_TS if slab_TS.shape[-1] else None, self.spike_bias,
                       slab_bias_S=slab_bias, **self.route_kwargs)
        return result.probs_TE, result.routing_map_TE


def _fixed_width_top_k(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor,
                       width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A variable-k routing map as fixed-width (top_k_index [T, M], top_k_weights [T, M]), the
    experts-module convention of transformers and the serving engines. Active experts come
    first, largest weight first; the remaining slots get weight 0 and repeat the token's first
    expert. A padded slot so contributes nothing, and its index is in [0, E): transformers'
    grouped_mm leaves rows of an out-of-range index uninitialised, batched_mm indexes the
    weights with it, and vLLM's fused MoE sizes its work by it. Repeating a loaded expert also
    costs the least memory traffic."""
    score_TE = torch.where(routing_map_TE, probs_TE, torch.full_like(probs_TE, -1.0))
    top_score_TM, top_index_TM = torch.topk(score_TE, width, dim=-1)
    real_TM = top_score_TM >= 0  # every token has >= 1 active expert: slot 0 is always real
    top_index_TM = torch.where(real_TM, top_index_TM, top_index_TM[:, :1])
    top_weights_TM = torch.where(real_TM, top_score_TM, torch.zeros_like(top_score_TM))
    return top_index_TM, top_weights_TM


class DirMoESparseBlock(nn.Module):
    """MoE layer: every token goes to its 1..max_active routed experts, weighted by the router
    probabilities; plus the (optionally sigmoid-gated) shared expert."""

    def __init__(self, config: DirMoEHFConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = DirMoERouter(config)
        experts_cls = DirMoEExperts if config.gated_linear_unit else DirMoEUngatedExperts
        self.experts = experts_cls(config)
        if config.shared_expert_intermediate_size:
            self.shared_expert = DirMoEMLP(config, config.shared_expert_intermediate_size)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        # 1. Route (fp32), as fixed-width top-k ids and weights.
        probs_TE, routing_map_TE = self.router(x_TD)
        top_k_index_TM, top_k_weights_TM = _fixed_width_top_k(probs_TE, routing_map_TE,
                                                              self.top_k)
        # 2. Routed experts.
        out_TD = self.experts(x_TD, top_k_index_TM, top_k_weights_TM)
        # 3. Shared expert.
        if hasattr(self, "shared_expert"):
            shared_TD = self.shared_expert(x_TD)
            if hasattr(self, "shared_expert_gate"):
                shared_TD = shared_TD * torch.sigmoid(self.shared_expert_gate(x_TD))
            out_TD = out_TD + shared_TD
        return out_TD.view_as(hidden_states)


class DirMoEDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)) with a dense or MoE MLP."""

    def __init__(self, config: DirMoEHFConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attn = DirMoEAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config, config.hidden_size)
        if layer_idx in config.moe_layers:
            self.mlp = DirMoESparseBlock(config)
        else:
            self.mlp = DirMoEMLP(config, config.intermediate_size)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                **kwargs):
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                     attention_mask, past_key_values, **kwargs)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DirMoEPreTrainedModel(PreTrainedModel):
    config_class = DirMoEHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["DirMoEDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # Every attention implementation of transformers' interface, and a serving engine's own
    # (vLLM's / SGLang's Transformers backend register theirs and require this flag).
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Router math is fp32 in Megatron whatever the model dtype; keep its weights fp32 too.
    _keep_in_fp32_modules_strict = ["router"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DirMoERouter):
            _init.normal_(module.weight, mean=0.0, std=std)
            _init.zeros_(module.spike_bias)
            if module.slab_bias is not None:
                _init.zeros_(module.slab_bias)
        elif isinstance(module, (DirMoEExperts, DirMoEUngatedExperts)):
            for param in module.parameters(recurse=False):
                _init.normal_(param, mean=0.0, std=std)


class DirMoEModel(DirMoEPreTrainedModel):
    """The decoder stack without the LM head."""

    def __init__(self, config: DirMoEHFConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DirMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = _norm(config, config.hidden_size)
        self.rotary_emb = DirMoERotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[BaseModelOutputWithPast, tuple]:
        """`cache` (older name `past_key_values`) holds the keys and values of the tokens before
        `input_ids`; positions continue from its length unless `position_ids` are given (as
        `generate` does, counting from each row's first unpadded token). `attention_mask` is
        the 2D padding mask over cached + new tokens (1 = token, 0 = padding), or a prepared 4D
        mask. Other keyword arguments go to the attention implementation."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = _one_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        kwargs.pop("cache_position", None)  # older generate(); positions come from the cache
        x_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        S = x_BSD.shape[1]
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + S, device=x_BSD.device)[None]
        # The mask each attention implementation wants (additive, boolean, BlockMask or None),
        # from transformers' own builder. The cache goes positionally: its keyword is
        # `past_key_values` up to transformers 5.23 and `cache` from 5.24.
        mask = create_causal_mask(self.config, x_BSD, attention_mask, cache,
                                  position_ids=position_ids)
        rope = self.rotary_emb(position_ids)
        for layer in self.layers:
            x_BSD = layer(x_BSD, rope, mask, cache, position_ids=position_ids, **kwargs)
        out = BaseModelOutputWithPast(last_hidden_state=self.norm(x_BSD), **{CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()


class DirMoEForCausalLM(DirMoEPreTrainedModel, GenerationMixin):
    """DirMoE decoder + LM head (tied to the embedding when `config.tie_word_embeddings`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DirMoEHFConfig):
        super().__init__(config)
        self.model = DirMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional[Cache] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[CausalLMOutputWithPast, tuple]:
        """Logits over the vocabulary, and with `labels` transformers' causal-LM loss (position t
        predicts label t + 1; -100 is ignored). See `DirMoEModel.forward` for the cache."""
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index")
                       if k in kwargs}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_BSD = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_BSD = hidden_BSD[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_BSD = hidden_BSD[:, logits_to_keep]
        logits_BSV = self.lm_head(hidden_BSD)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits_BSV, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs
            )
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits_BSV, **{CACHE_FIELD: getattr(out, CACHE_FIELD)}
        )
        return result if return_dict is not False else result.to_tuple()
