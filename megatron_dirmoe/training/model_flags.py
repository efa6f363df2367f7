"""Megatron-LM's model flags on the DirMoE entry point: each one honoured, or refused at start-up.

Megatron-LM's ``pretrain_gpt.py`` builds its model from two things: the `TransformerConfig` that
``core_transformer_config_from_args`` makes of the arguments, and a few arguments its
``gpt_builder`` / ``model_provider`` read directly (``--spec``, ``--rotary-percent``,
``--mtp-num-layers``, ...). The entry point builds the same config
(`megatron_dirmoe.training.builders`), so every config field reaches Megatron-Core's modules as it
does in ``pretrain_gpt``. What differs is accounted for here, one table each:

* :data:`BUILDER_FLAGS` -- the arguments ``gpt_builder``/``model_provider`` read directly, and how
  `build_model_from_args` honours each.
* :data:`CONFIG_DERIVED_FLAGS` -- arguments ``core_transformer_config_from_args`` turns into
  config fields under other names (honoured through the config).
* :data:`TRAINING_FLAGS` -- arguments in the model groups of Megatron's parser that
  `megatron.training` (not the model builder) acts on.
* :data:`ROUTER_FLAGS` -- the config fields Megatron's `TopKRouter` reads. `DirichletRouter`
  replaces it, so each is honoured by DirMoE, inert exactly as in Megatron, or refused.
* :data:`LOCAL_SPEC_FLAGS` -- the config fields Megatron's local `DotProductAttention` and
  `WrappedTorchNorm` read that `SDPAttention` / `TorchNorm` (the local spec here, which every
  CPU run uses) do not: refused on that spec.
* :data:`REFUSALS` -- everything refused, checked by :func:`check_model_flags` at start-up (and
  by the Slurm dry run, which calls the same parse).

``tests/unit/test_model_flags.py`` walks Megatron's parser and ``TopKRouter``'s source, so a flag
that a new megatron-core adds fails CI until it is placed in one of these tables.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "MODEL_GROUPS",
    "BUILDER_FLAGS",
    "CONFIG_DERIVED_FLAGS",
    "TRAINING_FLAGS",
    "ROUTER_FLAGS",
    "LOCAL_SPEC_FLAGS",
    "REFUSALS",
    "Refusal",
    "UnsupportedFlagError",
    "check_model_flags",
]


class UnsupportedFlagError(ValueError):
    """A Megatron flag the DirMoE entry point would otherwise silently ignore."""


# Argument groups of Megatron's parser that describe the model.
MODEL_GROUPS = ("transformer configuration", "network size", "moe", "mla",
                "experimental_attention_variant", "heterogeneous architecture",
                "Transformer-Engine")

BUILDER_FLAGS: dict[str, str] = {
    "spec": "your layer/block spec (module path and name); DirMoE routers and the variable-k "
            "MoE layer are swapped into its MoE layers",
    "max_position_embeddings": "GPTModel(max_sequence_length=...)",
    "position_embedding_type": "GPTModel(position_embedding_type=...)",
    "rotary_base": "GPTModel(rotary_base=...)",
    "rotary_percent": "GPTModel(rotary_percent=...)",
    "use_rope_scaling": "GPTModel(rope_scaling=...)",
    "rope_scaling_factor": "GPTModel(rope_scaling_factor=...)",
    "rotary_seq_len_interpolation_factor": "GPTModel(seq_len_interpolation_factor=...)",
    "untie_embeddings_and_output_weights": "GPTModel(share_embeddings_and_output_weights=not ...)",
    "fp16_lm_cross_entropy": "GPTModel(fp16_lm_cross_entropy=...)",
    "make_vocab_size_divisible_by": "padded vocabulary (megatron.training's tokenizer set-up)",
    "qk_l2_norm": "config field, and the decoder/MTP specs' qk_l2_norm argument",
    "mtp_num_layers": "config field, and an MTP block of DirMoE MoE layers (GPTModel mtp_block_spec)",
    "transformer_impl": "TE spec (transformer_engine) or the local spec (local)",
    "normalization": "config field, and the local spec's norm",
    "record_memory_history": "torch.cuda.memory._record_memory_history in the CUDA model provider",
    "memory_snapshot_path": "the OOM snapshot file of --record-memory-history",
    "num_experts": "config num_moe_experts; every MoE layer gets a DirMoE (or TopK) router",
    # Deprecated spellings that megatron.training's validate_args folds into the above.
    "use_rotary_position_embeddings": "validate_args: --position-embedding-type rope",
    "add_position_embedding": "validate_args: --no-position-embedding -> position type none",
}

CONFIG_DERIVED_FLAGS: dict[str, str] = {
    "group_query_attention": "num_query_groups",
    "swiglu": "gated_linear_unit + silu",
    "squared_relu": "activation_func",
    "quick_geglu": "gated_linear_unit + quick_gelu",
    "openai_gelu": "activation_func",
    "onnx_safe": "activation_func (erf gelu)",
    "yarn_original_max_position_embeddings": "YaRN config",
    "yarn_beta_fast": "YaRN config",
    "yarn_beta_slow": "YaRN config",
    "yarn_correction_range_round_to_int": "YaRN config",
    "q_lora_rank": "MLATransformerConfig",
    "kv_lora_rank": "MLATransformerConfig",
    "qk_head_dim": "MLATransformerConfig",
    "qk_pos_emb_head_dim": "MLATransformerConfig",
    "v_head_dim": "MLATransformerConfig",
    "rotary_scaling_factor": "MLATransformerConfig",
    "mscale": "MLATransformerConfig",
    "mscale_all_dim": "MLATransformerConfig",
    "cache_mla_latents": "MLATransformerConfig",
    "mla_down_proj_fusion": "MLATransformerConfig / TE MLA spec",
    "fp4_param_gather": "fp4_param",
    "fp8_param_gather": "fp8_param",
    "te_precision_config_file": "TE precision config",
}

TRAINING_FLAGS: dict[str, str] = {
    "decoder_num_layers": "validate_args: --num-layers",
    "encoder_num_layers": "validate_args (encoder-decoder models only; unused by GPT)",
    "relative_attention_num_buckets": "T5 only (position type relative)",
    "relative_attention_max_distance": "T5 only (position type relative)",
    "bert_binary_head": "BERT only",
    "moe_upcycling_granularity": "applies with --moe-use-upcycling only (refused)",
}

# TopKRouter's config fields (megatron/core/transformer/moe/router.py) and what DirichletRouter
# does with each: "honoured: ...", "inert: ..." (ignored exactly as by TopKRouter), or
# "refused: ..." (then it is in REFUSALS).
ROUTER_FLAGS: dict[str, str] = {
    "moe_router_topk": "honoured: set to DirMoE's max_active, the per-token cap (layout check)",
    "moe_aux_loss_coeff": "honoured: with aux_loss, replaces --dirmoe-aux-loss-coeff as the "
                          "weight of the router's Switch loss on --dirmoe-aux-loss-scores (a "
                          "warning at k >= 2 of the default recipe with "
                          "--dirmoe-count-control-on routed, where it can leave the gates unused)",
    "moe_router_load_balancing_type": "honoured: aux_loss or none; others refused (none does "
                                      "not turn off --dirmoe-aux-loss-coeff)",
    "moe_z_loss_coeff": "honoured: z-loss on the spike logits",
    "moe_router_dtype": "honoured: router math is fp32 (fp64 refused)",
    "moe_expert_capacity_factor": "refused: use --dirmoe-capacity-factor (layout check)",
    "moe_pad_expert_input_to_capacity": "refused: needs Megatron's capacity factor (layout check)",
    "moe_token_drop_policy": "inert: applies with --moe-expert-capacity-factor only (refused); "
                             "DirMoE's capacity drops the lowest probability",
    "moe_router_enable_expert_bias": "refused: DirMoE's own is --dirmoe-load-control-rate",
    "moe_router_bias_update_rate": "inert: applies with --moe-router-enable-expert-bias only",
    "moe_router_score_function": "refused: DirMoE's scores are its spike/slab weights",
    "moe_router_pre_softmax": "refused: TopK softmax order",
    "moe_router_topk_scaling_factor": "refused: TopK weight scaling",
    "moe_router_num_groups": "refused: group-limited TopK routing",
    "moe_router_group_topk": "refused: group-limited TopK routing",
    "moe_router_force_load_balancing": "refused: TopK benchmarking mode",
    "moe_router_force_biased": "refused: TopK benchmarking mode",
    "moe_router_fusion": "refused: TE fused TopK kernel",
    "moe_input_jitter_eps": "refused: TopK input jitter",
    "moe_enable_routing_replay": "refused: replays TopK decisions",
}

# Config fields that Megatron's local DotProductAttention / WrappedTorchNorm read and that
# SDPAttention / TorchNorm do not, with what the local spec does about each.
LOCAL_SPEC_FLAGS: dict[str, str] = {
    "window_size": "refused: sliding-window attention",
    "window_attn_skip_freq": "refused: sliding-window attention",
    "softmax_type": "refused unless vanilla (off-by-one / learnable softmax)",
    "layernorm_zero_centered_gamma": "refused (WrappedTorchNorm refuses it too)",
    "apply_query_key_layer_scaling": "same math: SDPA scales by 1/sqrt(d) in fp32 internally",
    "attention_softmax_in_fp32": "same math: SDPA accumulates the softmax in fp32",
    "masked_softmax_fusion": "kernel choice only",
    "memory_efficient_layer_norm": "kernel choice only",
    "persist_layer_norm": "kernel choice only",
    "bf16": "mixed precision (model dtype)",
    "fp16": "mixed precision (model dtype)",
    "init_method": "no parameters in core attention",
    "perform_initialization": "no parameters in core attention",
    "kv_channels": "head size from the query/key/value shapes",
}


@dataclass(frozen=True)
class Refusal:
    """A flag (Megatron attribute ``dest``) refused when ``applies(args)``; ``why`` says what
    to do instead."""

    dest: str
    applies: Callable[[Any], bool]
    why: str

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _dirichlet(args) -> bool:
    return getattr(args, "dirmoe_router", "dirichlet") == "dirichlet"


def _local_spec(args) -> bool:
    return getattr(args, "transformer_impl", "local") != "transformer_engine"


def _set(dest: str, default: Any = None, *, when: Callable[[Any], bool] = lambda a: True):
    def applies(args) -> bool:
        value = getattr(args, dest, default)
        return when(args) and value not in (default, None, False)

    return applies


def _balancing_types(args) -> list:
    value = getattr(args, "moe_router_load_balancing_type", "none")
    return value if isinstance(value, list) else [value]


REFUSALS: tuple[Refusal, ...] = (
    Refusal("yaml_cfg", _set("yaml_cfg"),
            "the DirMoE entry point takes command-line flags; pass the YAML's values as flags"),
    Refusal("heterogeneous_layers_config_path", _set("heterogeneous_layers_config_path"),
            "heterogeneous (per-layer) architectures have no DirMoE layer spec"),
    Refusal("heterogeneous_layers_config_encoded_json",
            _set("heterogeneous_layers_config_encoded_json"),
            "heterogeneous (per-layer) architectures have no DirMoE layer spec"),
    Refusal("experimental_attention_variant", _set("experimental_attention_variant"),
            "experimental attention variants build their own block spec, without DirMoE layers"),
    Refusal("moe_use_upcycling", _set("moe_use_upcycling"),
            "upcycling converts a dense checkpoint into TopK experts; train DirMoE from scratch "
            "or load a DirMoE checkpoint"),
    Refusal("overlap_moe_expert_parallel_comm", _set("overlap_moe_expert_parallel_comm"),
            "the overlapped schedule plan (build_schedule_plan) splits Megatron's fixed-top-k "
            "MoE layer; DirMoE's variable-k layer has no such split yet. Drop the flag"),
    Refusal("record_memory_history",
            _set("record_memory_history", when=lambda a: not getattr(a, "dirmoe_use_cuda", False)),
            "records CUDA allocations: it needs the CUDA path (--dirmoe-device cuda)"),
    Refusal("moe_router_load_balancing_type",
            lambda a: _dirichlet(a) and any(t not in ("aux_loss", "none")
                                            for t in _balancing_types(a)),
            "DirichletRouter takes aux_loss or none (seq_aux_loss, global_aux_loss, sinkhorn "
            "and quantile_balancing are TopK-specific); the calibrated recipe balances load "
            "itself (--dirmoe-load-control-rate for k >= 2, --dirmoe-balance-weight at k = 1)"),
    Refusal("moe_router_dtype",
            lambda a: _dirichlet(a) and getattr(a, "moe_router_dtype", None) == "fp64",
            "DirMoE's router math is fp32; use --moe-router-dtype fp32 or leave it unset"),
    Refusal("moe_router_enable_expert_bias", _set("moe_router_enable_expert_bias", when=_dirichlet),
            "DirMoE has its own per-expert bias on the routing decision: "
            "--dirmoe-load-control-rate (on by default for k >= 2)"),
    *(Refusal(dest, _set(dest, default, when=_dirichlet),
              f"{ROUTER_FLAGS[dest].split(': ', 1)[1]}: a TopKRouter setting that DirMoE routing "
              "does not have (it applies with --dirmoe-router topk)")
      for dest, default in (("moe_router_score_function", "softmax"),
                            ("moe_router_pre_softmax", False),
                            ("moe_router_topk_scaling_factor", None),
                            ("moe_router_num_groups", None),
                            ("moe_router_group_topk", None),
                            ("moe_router_force_load_balancing", False),
                            ("moe_router_force_biased", None),
                            ("moe_router_fusion", False),
                            ("moe_input_jitter_eps", None),
                            ("moe_enable_routing_replay", False))),
    Refusal("window_size", _set("window_size", when=_local_spec),
            "the local spec's SDPAttention has no sliding window: use --transformer-impl "
            "transformer_engine on GPUs"),
    Refusal("window_attn_skip_freq", _set("window_attn_skip_freq", when=_local_spec),
            "the local spec's SDPAttention has no sliding window: use --transformer-impl "
            "transformer_engine on GPUs"),
    Refusal("softmax_type", _set("softmax_type", "vanilla", when=_local_spec),
            "the local spec's SDPAttention computes the vanilla softmax: use --transformer-impl "
            "transformer_engine on GPUs"),
    Refusal("layernorm_zero_centered_gamma",
            _set("layernorm_zero_centered_gamma", when=_local_spec),
            "(--apply-layernorm-1p) torch norms have no zero-centred gamma: use "
            "--transformer-impl transformer_engine on GPUs"),
)


def check_model_flags(args: argparse.Namespace) -> None:
    """Raise `UnsupportedFlagError` naming every given flag the entry point cannot honour."""
    problems = []
    for refusal in REFUSALS:
        if refusal.applies(args):
            value = getattr(args, refusal.dest, None)
            shown = "" if value is True else f" {value}"
            flag = "--apply-layernorm-1p" if refusal.dest == "layernorm_zero_centered_gamma" \
                else refusal.flag
            problems.append(f"{flag}{shown}: {refusal.why}")
    if problems:
        raise UnsupportedFlagError("not supported by the DirMoE entry point: "
                                   + "; ".join(problems))
