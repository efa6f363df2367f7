"""Hugging Face `transformers` implementation of a Megatron GPT with DirMoE layers.

Same architecture as `megatron_dirmoe.model.build_gpt_model` (pre-norm decoder, RMSNorm or
LayerNorm, RoPE, GQA, gated or plain MLP, MoE layers at `config.moe_layers`, optional shared
expert) with the DirMoE router's deterministic evaluation path (`routing.route(training=False)`).
The routing math is not re-implemented here: it is imported from `dirmoe_routing`, which is
`megatron_dirmoe/routing.py` (re-exported inside the package, copied verbatim into exported
folders), so training and inference cannot drift apart.

Exported next to converted checkpoints: imports nothing but `torch` and `transformers`.

Shape suffixes: B batch, S query length, K key length (past + S), D hidden, H heads,
G key/value heads, d head dim, T tokens (B * S), E experts, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as _init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

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


class DirMoEAttention(nn.Module):
    """Causal self-attention with GQA, optional QK norm and RoPE (Megatron `SelfAttention`)."""

    def __init__(self, config: DirMoEHFConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
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
        x_BSD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask_BQK: torch.Tensor,
        cache: Optional[Cache],
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        # 1. Projections to heads: [B, heads, S, d].
        q_BHSd = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGSd = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGSd = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # 2. QK norm (per head, before RoPE, as Megatron).
        if hasattr(self, "q_norm"):
            q_BHSd, k_BGSd = self.q_norm(q_BHSd), self.k_norm(k_BGSd)
        # 3. RoPE (cos/sin in fp32 cast to the activation dtype, as Megatron).
        cos_B1Sd, sin_B1Sd = (t[:, None].to(q_BHSd.dtype) for t in rope)
        q_BHSd = q_BHSd * cos_B1Sd + _rotate_half(q_BHSd) * sin_B1Sd
        k_BGSd = k_BGSd * cos_B1Sd + _rotate_half(k_BGSd) * sin_B1Sd
        # 4. KV cache: append this step's keys/values, attend over all of them.
        if cache is not None:
            k_BGSd, v_BGSd = cache.update(k_BGSd, v_BGSd, self.layer_idx)
        # 5. Attention (True in the mask = attend).
        out_BHSd = F.scaled_dot_product_attention(
            q_BHSd, k_BGSd, v_BGSd, attn_mask=mask_BQK[:, None],
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(out_BHSd.transpose(1, 2).reshape(B, S, -1))


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


class DirMoERouter(nn.Module):
    """DirMoE router, evaluation path only: spike and slab logits from one fp32 GEMM on the
    stacked weight [W_z; W_v] (shape [2E, D], as in Megatron), then `route(training=False)`."""

    def __init__(self, config: DirMoEHFConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(2 * config.num_experts, config.hidden_size))
        self.spike_bias = nn.Parameter(torch.empty(config.num_experts))
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
            training=False,
        )

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (probs [T, E] fp32, zero off the active set; routing map [T, E] bool)."""
        logits_T2E = F.linear(x_TD.float(), self.weight.float())
        spike_TE, slab_TE = logits_T2E.split(self.num_experts, dim=-1)
        result = route(spike_TE, slab_TE, self.spike_bias, **self.route_kwargs)
        return result.probs_TE, result.routing_map_TE


class DirMoESparseBlock(nn.Module):
    """MoE layer: every token goes to its 1..max_active routed experts, weighted by the router
    probabilities; plus the (optionally sigmoid-gated) shared expert."""

    def __init__(self, config: DirMoEHFConfig):
        super().__init__()
        self.router = DirMoERouter(config)
        self.experts = nn.ModuleList(
            DirMoEMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        if config.shared_expert_intermediate_size:
            self.shared_expert = DirMoEMLP(config, config.shared_expert_intermediate_size)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        # 1. Route (fp32).
        probs_TE, routing_map_TE = self.router(x_TD)
        # 2. Run each expert on its tokens, accumulate weighted outputs in fp32.
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        token_idx_E, expert_idx_E = routing_map_TE.nonzero(as_tuple=True)
        for expert in expert_idx_E.unique().tolist():
            tokens = token_idx_E[expert_idx_E == expert]
            y = self.experts[expert](x_TD[tokens])
            out_TD.index_add_(0, tokens, y.float() * probs_TE[tokens, expert, None])
        out_TD = out_TD.to(x_TD.dtype)
        # 3. Shared expert.
        if hasattr(self, "shared_expert"):
            shared_TD = self.shared_expert(x_TD)
            if hasattr(self, "shared_expert_gate"):
                shared_TD = shared_TD * torch.sigmoid(self.shared_expert_gate(x_TD))
            out_TD = out_TD + shared_TD
        return out_TD.view_as(x_BSD)


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

    def forward(self, x_BSD, rope, mask_BQK, cache):
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), rope, mask_BQK, cache)
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))


class DirMoEPreTrainedModel(PreTrainedModel):
    config_class = DirMoEHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["DirMoEDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DirMoERouter):
            _init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            _init.zeros_(module.spike_bias)


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
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`cache` (older name `past_key_values`) holds the keys and values of the tokens before
        `input_ids`; positions continue from its length unless `position_ids` are given (as
        `generate` does, counting from each row's first unpadded token). `attention_mask` is
        the 2D padding mask over cached + new tokens (1 = token, 0 = padding)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = _one_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x_BSD.shape[:2]
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=x_BSD.device)[None].expand(B, -1)
        mask_BQK = self._attention_mask(attention_mask, B, S, past, x_BSD.device)
        rope = self.rotary_emb(position_ids)
        for layer in self.layers:
            x_BSD = layer(x_BSD, rope, mask_BQK, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x_BSD), **{CACHE_FIELD: cache})

    @staticmethod
    def _attention_mask(attention_mask, B, S, past, device) -> torch.Tensor:
        """Boolean [B, S, past + S], True = attend: causal, minus padded keys. A query may
        always attend to itself, so fully padded rows stay finite."""
        K = past + S
        q_pos_S = torch.arange(past, K, device=device)
        k_pos_K = torch.arange(K, device=device)
        mask_BQK = (k_pos_K[None, :] <= q_pos_S[:, None])[None].expand(B, S, K)
        if attention_mask is not None:
            keep_BK = attention_mask[:, -K:].to(device=device, dtype=torch.bool)
            mask_BQK = mask_BQK & keep_BK[:, None, :]
            mask_BQK = mask_BQK | (k_pos_K[None, :] == q_pos_S[:, None])[None]
        return mask_BQK


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
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits over the vocabulary, and with `labels` transformers' causal-LM loss (position t
        predicts label t + 1; -100 is ignored). See `DirMoEModel.forward` for the cache."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
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
                logits=logits_BSV, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits_BSV, **{CACHE_FIELD: getattr(out, CACHE_FIELD)}
        )
