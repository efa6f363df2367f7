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
    )
