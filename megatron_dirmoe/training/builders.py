"""Model and config construction from the parsed command line (shared by the GPU and CPU
paths, and by the HF converter, which rebuilds the model from a checkpoint's ``args``)."""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_dirmoe.config import dirmoe_config_from_args

__all__ = ["transformer_config_from_args", "build_model_from_args"]


def transformer_config_from_args(args: argparse.Namespace):
    from megatron.training.arguments import core_transformer_config_from_args

    return core_transformer_config_from_args(args)


def _router_for(args: argparse.Namespace, on_cuda: bool):
    if args.dirmoe_router == "dirichlet":
        return None  # the DirMoE spec's default
    if on_cuda:
        from megatron.core.transformer.moe.router import TopKRouter

        return TopKRouter
    from megatron_dirmoe.baselines import DeviceAgnosticTopKRouter

    return DeviceAgnosticTopKRouter


def build_model_from_args(args: argparse.Namespace, config=None, *, pre_process: bool = True,
                          post_process: bool = True, vp_stage: Optional[int] = None,
                          pg_collection=None):
    """A `GPTModel` with DirMoE (or ``--dirmoe-router topk``) MoE layers; the signature is
    `megatron.training`'s model provider's."""
    from megatron_dirmoe.model import build_gpt_model

    if config is None:
        config = transformer_config_from_args(args)
    on_cuda = bool(getattr(args, "dirmoe_use_cuda", False))
    use_te = None if args.transformer_impl == "transformer_engine" else False
    return build_gpt_model(
        config,
        dirmoe_config_from_args(args),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        use_te=use_te,
        router=_router_for(args, on_cuda),
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        vp_stage=vp_stage,
        rotary_percent=args.rotary_percent,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        qk_l2_norm=bool(getattr(args, "qk_l2_norm", False)),
        layer_spec=user_layer_spec(args, config, vp_stage),
        pg_collection=pg_collection,
    )


def user_layer_spec(args: argparse.Namespace, config=None, vp_stage: Optional[int] = None):
    """Megatron's ``--spec MODULE NAME``: the named layer/block spec (a `ModuleSpec` or
    `TransformerBlockSubmodules`, or a function of the `TransformerConfig` returning one), or
    None without the flag. Import errors name the flag."""
    spec_path = getattr(args, "spec", None)
    if not spec_path:
        return None
    import importlib
    import inspect

    if len(spec_path) != 2:
        raise ValueError(f"--spec {' '.join(spec_path)}: give a module path and a name, e.g. "
                         "--spec my_specs dirmoe_layer_spec")
    module_path, name = spec_path
    try:
        spec = getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--spec {module_path} {name}: cannot import it ({exc})") from exc
    if inspect.isfunction(spec):
        if config is None:
            config = transformer_config_from_args(args)
        kwargs = {"vp_stage": vp_stage} if "vp_stage" in inspect.signature(spec).parameters else {}
        spec = spec(config, **kwargs)
    return spec
