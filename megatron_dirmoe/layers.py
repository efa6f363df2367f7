"""Small Megatron-compatible modules that let the local (non-TE) GPT spec run on CPU.

Megatron-Core's local `DotProductAttention` allocates its score buffer on
`torch.cuda.current_device()`, and `WrappedTorchNorm` refuses sequence parallelism. These two
replacements keep the same constructor signatures, so a spec can swap them in.
`RotaryEmbedding` moves its frequencies to CUDA on first use; `DeviceAgnosticRotaryEmbedding`
only does so when CUDA exists (see `megatron_dirmoe.model.build_gpt_model`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

__all__ = ["SDPAttention", "TorchNorm", "DeviceAgnosticRotaryEmbedding"]


class SDPAttention(MegatronModule):
    """Core attention with `torch.nn.functional.scaled_dot_product_attention` (CPU or CUDA).

    Drop-in for Megatron's local `DotProductAttention`: takes query/key/value as
    [s, b, heads_per_partition, head_dim] and returns [s, b, hidden_per_partition].
    Supports GQA, causal masks and Megatron boolean masks (True = masked out).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the TE spec")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """[s, b, n, d] inputs -> [s, b, n * d] context."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        attn_mask = None
        is_causal = mask_type == AttnMaskType.causal
        if attention_mask is not None and not is_causal:
            attn_mask = ~attention_mask.bool()  # SDPA: True = attend
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=self.num_heads != self.num_groups,
        )
        seq, batch = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(seq, batch, -1)


class TorchNorm:
    """LayerNorm / RMSNorm from torch whose parameters carry Megatron's `sequence_parallel`
    flag, so sequence parallelism all-reduces their gradients (Megatron's `WrappedTorchNorm`
    rejects sequence parallelism)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(
                f"--normalization {config.normalization!r}: TorchNorm supports LayerNorm and RMSNorm"
            )
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm


class DeviceAgnosticRotaryEmbedding(RotaryEmbedding):
    """Megatron's `RotaryEmbedding`, minus its unconditional move of `inv_freq` to
    `torch.cuda.current_device()` (which fails on CPU-only machines)."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        if self.inv_freq.device.type == "cpu" and torch.cuda.is_available():
            self.inv_freq = self.inv_freq.to(device=torch.cuda.current_device())
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(
                freqs.shape[0], -1
            )
        return emb[:, None, None, :]  # [s, 1, 1, dim]
