"""Build a Megatron-Core GPT model with DirMoE (or any other) routers, on CPU or GPU."""

from __future__ import annotations

from typing import Any, Callable, Optional

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dirmoe.config import DirMoEConfig
from megatron_dirmoe.layers import DeviceAgnosticRotaryEmbedding
from megatron_dirmoe.specs import (
    get_dirmoe_decoder_block_spec,
    get_dirmoe_mtp_block_spec,
    with_dirmoe_routers,
)

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
    rotary_percent: float = 1.0,
    rope_scaling: bool = False,
    rope_scaling_factor: float = 8.0,
    seq_len_interpolation_factor: Optional[float] = None,
    fp16_lm_cross_entropy: bool = False,
    qk_l2_norm: bool = False,
    layer_spec: Any = None,
    pg_collection: Any = None,
) -> GPTModel:
    """A `GPTModel` whose MoE layers use DirMoE routers (or `router`, e.g. `TopKRouter`).

    The block spec follows `config` (number of layers on this pipeline stage, `moe_layer_freq`,
    normalisation) and uses TE modules when TE is importable unless `use_te=False`;
    `layer_spec` (Megatron's ``--spec``) replaces it, with DirMoE routers swapped in. With
    ``config.mtp_num_layers`` the last stage also gets a multi-token-prediction block whose
    layers are the decoder's last layer (DirMoE MoE layers when that layer is MoE). The other
    keywords are `GPTModel`'s, as Megatron-LM's ``pretrain_gpt`` passes them.
    """
    if layer_spec is not None:
        from megatron.core.transformer.transformer_block import _get_block_submodules

        from megatron_dirmoe.specs import _use_te

        # As a block (this stage's layers plus the final norm), so a local spec's norms can be
        # made CPU-capable too.
        block = _get_block_submodules(config, layer_spec, vp_stage=vp_stage, pp_rank=pp_rank)
        spec = with_dirmoe_routers(block, dirmoe_config, use_te=_use_te(use_te), router=router)
    else:
        spec = get_dirmoe_decoder_block_spec(
            config, dirmoe_config, use_te=use_te, vp_stage=vp_stage, pp_rank=pp_rank,
            router=router, qk_l2_norm=qk_l2_norm,
        )
    mtp_spec = None
    if config.mtp_num_layers:
        mtp_spec = get_dirmoe_mtp_block_spec(
            config, dirmoe_config, use_te=use_te, vp_stage=vp_stage, router=router,
            qk_l2_norm=qk_l2_norm, layer_spec=layer_spec,
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
        rotary_percent=rotary_percent,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_scaling_factor,
        seq_len_interpolation_factor=seq_len_interpolation_factor,
        fp16_lm_cross_entropy=fp16_lm_cross_entropy,
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    rope = getattr(model, "rotary_pos_emb", None)
    if type(rope) is RotaryEmbedding:
        # Same state, device-agnostic `get_emb` (see layers.DeviceAgnosticRotaryEmbedding).
        rope.__class__ = DeviceAgnosticRotaryEmbedding
    return model
