"""Build a Megatron-Core GPT model with DirMoE (or any other) routers, on CPU or GPU."""

from __future__ import annotations

from typing import Any, Callable, Optional

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dirmoe.config import DirMoEConfig
from megatron_dirmoe.layers import DeviceAgnosticRotaryEmbedding
from megatron_dirmoe.specs import get_dirmoe_decoder_block_spec

__all__ = ["build_gpt_model"]


def build_gpt_model(
    config: TransformerConfig,
    dirmoe_config: Optional[DirMoEConfig] = None,
    *,
    vocab_size: int,
    max_sequence_length: int,
    use_te: Optional[bool] = None,
    router: Optional[Callable[..., Any]] = None,
    pre_process: bool = True,
    post_process: bool = True,
    position_embedding_type: str = "rope",
    rotary_base: int = 10000,
    share_embeddings_and_output_weights: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> GPTModel:
    """A `GPTModel` whose MoE layers use DirMoE routers (or `router`, e.g. `TopKRouter`).

    The block spec follows `config` (number of layers on this pipeline stage, `moe_layer_freq`,
    normalisation) and uses TE modules when TE is importable unless `use_te=False`.
    """
    spec = get_dirmoe_decoder_block_spec(
        config, dirmoe_config, use_te=use_te, vp_stage=vp_stage, pp_rank=pp_rank, router=router
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
    rope = getattr(model, "rotary_pos_emb", None)
    if type(rope) is RotaryEmbedding:
        # Same state, device-agnostic `get_emb` (see layers.DeviceAgnosticRotaryEmbedding).
        rope.__class__ = DeviceAgnosticRotaryEmbedding
    return model
