"""The one table that says which Megatron tensor becomes which Hugging Face tensor.

Megatron names are those of the single-rank local-spec `GPTModel.state_dict()` (the converter
loads any TP/PP/EP checkpoint into that model first, so resharding is Megatron's job). HF names
are those of `megatron_dirmoe.hf.DirMoEForCausalLM`.

A rule names its tensors with `{layer}` / `{expert}` placeholders, says at which scope it
applies (the whole model, every layer, dense layers, MoE layers, the experts of a MoE layer:
one Megatron name per expert, stacked into one HF tensor) and which architecture features it
needs; :func:`expand` turns the table into concrete
(megatron names, hf names, transform) triples for one model, with no pattern matching. The
conversion then checks that the state dict holds exactly the expanded names.

Torch only (no Megatron, no transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from megatron_dirmoe.convert.transforms import (
    AttentionDims,
    Identity,
    SplitGatedFC1,
    SplitQKV,
    StackExperts,
)

__all__ = [
    "Rule",
    "TABLE",
    "Layout",
    "ConcreteMapping",
    "layout_from_hf_config",
    "expand",
    "megatron_to_hf",
    "hf_to_megatron",
    "ConversionError",
]


class ConversionError(ValueError):
    """A checkpoint does not match the expected architecture; the message names the tensor."""


@dataclass(frozen=True)
class Rule:
    # "model" | "layer" | "dense_layer" | "moe_layer" | "experts" ({expert} names on the
    # Megatron side expand to one name per expert of the layer, in expert order)
    scope: str
    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    transform: str = "identity"  # "identity" | "qkv" | "gated_fc1" | "stack_experts"
    requires: tuple[str, ...] = ()  # features that must all be present (see Layout.features)


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
_E = _L + "mlp.experts.local_experts.{expert}."
_HE = _H + "mlp.experts."
_S = _L + "mlp.shared_experts."
_HS = _H + "mlp.shared_expert."

TABLE: tuple[Rule, ...] = (
    # ---- embeddings, final norm, head
    Rule("model", ("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",)),
    Rule("model", ("decoder.final_layernorm.weight",), ("model.norm.weight",)),
    Rule("model", ("decoder.final_layernorm.bias",), ("model.norm.bias",), requires=("norm_bias",)),
    Rule("model", ("output_layer.weight",), ("lm_head.weight",), requires=("untied",)),
    # ---- attention
    Rule("layer", (_L + "input_layernorm.weight",), (_H + "input_layernorm.weight",)),
    Rule("layer", (_L + "input_layernorm.bias",), (_H + "input_layernorm.bias",),
         requires=("norm_bias",)),
    Rule("layer", (_L + "self_attention.linear_qkv.weight",),
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
          _H + "self_attn.v_proj.weight"), transform="qkv"),
    Rule("layer", (_L + "self_attention.q_layernorm.weight",), (_H + "self_attn.q_norm.weight",),
         requires=("qk_norm",)),
    Rule("layer", (_L + "self_attention.q_layernorm.bias",), (_H + "self_attn.q_norm.bias",),
         requires=("qk_norm", "norm_bias")),
    Rule("layer", (_L + "self_attention.k_layernorm.weight",), (_H + "self_attn.k_norm.weight",),
         requires=("qk_norm",)),
    Rule("layer", (_L + "self_attention.k_layernorm.bias",), (_H + "self_attn.k_norm.bias",),
         requires=("qk_norm", "norm_bias")),
    Rule("layer", (_L + "self_attention.linear_proj.weight",), (_H + "self_attn.o_proj.weight",)),
    Rule("layer", (_L + "pre_mlp_layernorm.weight",), (_H + "post_attention_layernorm.weight",)),
    Rule("layer", (_L + "pre_mlp_layernorm.bias",), (_H + "post_attention_layernorm.bias",),
         requires=("norm_bias",)),
    # ---- dense MLP
    Rule("dense_layer", (_L + "mlp.linear_fc1.weight",),
         (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), transform="gated_fc1",
         requires=("gated",)),
    Rule("dense_layer", (_L + "mlp.linear_fc1.weight",), (_H + "mlp.up_proj.weight",),
         requires=("ungated",)),
    Rule("dense_layer", (_L + "mlp.linear_fc2.weight",), (_H + "mlp.down_proj.weight",)),
    # ---- MoE: router (the heads [W_z; W_v; ...] stay stacked: both sides compute one GEMM)
    Rule("moe_layer", (_L + "mlp.router.weight",), (_H + "mlp.router.weight",)),
    Rule("moe_layer", (_L + "mlp.router.spike_bias",), (_H + "mlp.router.spike_bias",)),
    Rule("moe_layer", (_L + "mlp.router.slab_bias",), (_H + "mlp.router.slab_bias",),
         requires=("slab_bias",)),
    # ---- MoE: routed experts, per expert in Megatron, packed [E, ...] in HF
    Rule("experts", (_E + "linear_fc1.weight",), (_HE + "gate_up_proj",),
         transform="stack_experts", requires=("gated",)),
    Rule("experts", (_E + "linear_fc1.weight",), (_HE + "up_proj",), transform="stack_experts",
         requires=("ungated",)),
    Rule("experts", (_E + "linear_fc2.weight",), (_HE + "down_proj",), transform="stack_experts"),
    # ---- MoE: shared expert
    Rule("moe_layer", (_S + "linear_fc1.weight",),
         (_HS + "gate_proj.weight", _HS + "up_proj.weight"),
         transform="gated_fc1", requires=("shared_expert", "gated")),
    Rule("moe_layer", (_S + "linear_fc1.weight",), (_HS + "up_proj.weight",),
         requires=("shared_expert", "ungated")),
    Rule("moe_layer", (_S + "linear_fc2.weight",), (_HS + "down_proj.weight",),
         requires=("shared_expert",)),
    Rule("moe_layer", (_S + "gate_weight",), (_H + "mlp.shared_expert_gate.weight",),
         requires=("shared_expert_gate",)),
)


@dataclass(frozen=True)
class Layout:
    """What the table needs to know about one model."""

    num_layers: int
    moe_layers: frozenset[int]
    num_experts: int
    features: frozenset[str]
    attention: AttentionDims


def layout_from_hf_config(config: Any) -> Layout:
    """Layout of a `DirMoEHFConfig` (any object with its attributes)."""
    features = {"gated" if config.gated_linear_unit else "ungated"}
    if config.normalization == "LayerNorm":
        features.add("norm_bias")
    if config.qk_layernorm:
        features.add("qk_norm")
    if not config.tie_word_embeddings:
        features.add("untied")
    if getattr(config, "router_slab", "head") == "gated":
        features.add("slab_bias")
    if config.shared_expert_intermediate_size:
        features.add("shared_expert")
        if config.shared_expert_gate:
            features.add("shared_expert_gate")
    return Layout(
        num_layers=config.num_hidden_layers,
        moe_layers=frozenset(config.moe_layers),
        num_experts=config.num_experts,
        features=frozenset(features),
        attention=AttentionDims(
            num_heads=config.num_attention_heads,
            num_query_groups=config.num_key_value_heads,
            head_dim=config.head_dim,
        ),
    )


@dataclass(frozen=True)
class ConcreteMapping:
    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    transform: Any  # Identity | SplitQKV | SplitGatedFC1 | StackExperts


def _transform(name: str, layout: Layout):
    if name == "identity":
        return Identity()
    if name == "qkv":
        return SplitQKV(layout.attention)
    if name == "gated_fc1":
        return SplitGatedFC1()
    if name == "stack_experts":
        return StackExperts(layout.num_experts)
    raise ValueError(f"unknown transform {name!r}")


def _placements(scope: str, layout: Layout) -> Iterable[dict]:
    layers = range(layout.num_layers)
    if scope == "model":
        yield {}
    elif scope == "layer":
        yield from ({"layer": i} for i in layers)
    elif scope == "dense_layer":
        yield from ({"layer": i} for i in layers if i not in layout.moe_layers)
    elif scope == "moe_layer":
        yield from ({"layer": i} for i in layers if i in layout.moe_layers)
    elif scope == "experts":
        yield from ({"layer": i} for i in layers if i in layout.moe_layers)
    else:
        raise ValueError(f"unknown rule scope {scope!r}")


def expand(layout: Layout, table: tuple[Rule, ...] = TABLE) -> list[ConcreteMapping]:
    """Every concrete mapping of `table` for one model, in table order."""
    out = []
    for rule in table:
        if not set(rule.requires) <= layout.features:
            continue
        transform = _transform(rule.transform, layout)
        experts = range(layout.num_experts) if rule.scope == "experts" else [None]
        for where in _placements(rule.scope, layout):
            out.append(
                ConcreteMapping(
                    megatron=tuple(name.format(**where, expert=e)
                                   for name in rule.megatron for e in experts),
                    hf=tuple(name.format(**where) for name in rule.hf),
                    transform=transform,
                )
            )
    return out


def _convert(
    state: Mapping[str, torch.Tensor],
    mappings: list[ConcreteMapping],
    *,
    source: str,
    expected_shapes: Mapping[str, tuple[int, ...]] | None,
) -> dict[str, torch.Tensor]:
    target = "hf" if source == "megatron" else "megatron"
    needed = [name for m in mappings for name in getattr(m, source)]
    missing = [name for name in needed if name not in state]
    unexpected = sorted(set(state) - set(needed))
    if missing or unexpected:
        raise ConversionError(
            f"{source} state dict does not match the architecture: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    out: dict[str, torch.Tensor] = {}
    for m in mappings:
        fn = m.transform.to_hf if source == "megatron" else m.transform.to_megatron
        try:
            results = fn(tuple(state[name] for name in getattr(m, source)))
        except (RuntimeError, ValueError) as err:
            raise ConversionError(
                f"cannot convert {source} tensor(s) {getattr(m, source)} "
                f"(shapes {[tuple(state[n].shape) for n in getattr(m, source)]}): {err}"
            ) from err
        for name, tensor in zip(getattr(m, target), results):
            if expected_shapes is not None:
                want = tuple(expected_shapes.get(name, ()))
                if tuple(tensor.shape) != want:
                    raise ConversionError(
                        f"{target} tensor {name!r} (from {source} {getattr(m, source)}) has shape "
                        f"{tuple(tensor.shape)}, the {target} model expects {want}"
                    )
            out[name] = tensor
    return out


def megatron_to_hf(
    state: Mapping[str, torch.Tensor],
    layout: Layout,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Megatron single-rank state dict -> HF state dict. Raises `ConversionError` naming the
    tensor on a missing / unexpected name or a shape the HF model does not expect."""
    return _convert(state, expand(layout), source="megatron", expected_shapes=expected_shapes)


def hf_to_megatron(
    state: Mapping[str, torch.Tensor],
    layout: Layout,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """HF state dict -> Megatron single-rank state dict (inverse of :func:`megatron_to_hf`)."""
    return _convert(state, expand(layout), source="hf", expected_shapes=expected_shapes)
