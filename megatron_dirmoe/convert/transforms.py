"""Pure tensor transforms between Megatron's fused layouts and Hugging Face's separate tensors.

Each transform maps a tuple of Megatron tensors to a tuple of HF tensors (`to_hf`) and back
(`to_megatron`); the two are exact inverses (tested). Torch only.

Shape legend: D hidden, G query groups (key/value heads), Q query heads per group, d head dim,
F ffn hidden size, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Identity", "SplitQKV", "SplitGatedFC1", "StackExperts", "AttentionDims"]

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class AttentionDims:
    num_heads: int
    num_query_groups: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


@dataclass(frozen=True)
class Identity:
    """One tensor, same layout on both sides."""

    arity = (1, 1)

    def to_hf(self, tensors: Tensors) -> Tensors:
        return tensors

    def to_megatron(self, tensors: Tensors) -> Tensors:
        return tensors


@dataclass(frozen=True)
class SplitQKV:
    """Megatron's fused `linear_qkv` weight [G * (Q + 2) * d, D] is grouped per key/value head:
    for each group g the rows are [q_(g,0) .. q_(g,Q-1), k_g, v_g], each d rows.
    HF: q [G * Q * d, D], k [G * d, D], v [G * d, D]. Also works for 1-D biases."""

    dims: AttentionDims
    arity = (1, 3)

    def to_hf(self, tensors: Tensors) -> Tensors:
        (qkv,) = tensors
        G, Q, d = self.dims.num_query_groups, self.dims.heads_per_group, self.dims.head_dim
        expected = G * (Q + 2) * d
        if qkv.shape[0] != expected:
            raise ValueError(f"fused QKV has {qkv.shape[0]} rows, expected G*(Q+2)*d = {expected}")
        grouped = qkv.reshape(G, (Q + 2) * d, *qkv.shape[1:])
        q, k, v = grouped.split([Q * d, d, d], dim=1)
        tail = qkv.shape[1:]
        return (
            q.reshape(G * Q * d, *tail).contiguous(),
            k.reshape(G * d, *tail).contiguous(),
            v.reshape(G * d, *tail).contiguous(),
        )

    def to_megatron(self, tensors: Tensors) -> Tensors:
        q, k, v = tensors
        G, Q, d = self.dims.num_query_groups, self.dims.heads_per_group, self.dims.head_dim
        tail = q.shape[1:]
        grouped = torch.cat(
            [q.reshape(G, Q * d, *tail), k.reshape(G, d, *tail), v.reshape(G, d, *tail)], dim=1
        )
        return (grouped.reshape(G * (Q + 2) * d, *tail).contiguous(),)


@dataclass(frozen=True)
class SplitGatedFC1:
    """Megatron's gated `linear_fc1` [2F, D] is [gate; up] (Megatron's GLU applies the
    activation to the first half). HF: gate_proj [F, D], up_proj [F, D]."""

    arity = (1, 2)

    def to_hf(self, tensors: Tensors) -> Tensors:
        (fc1,) = tensors
        if fc1.shape[0] % 2:
            raise ValueError(f"gated fc1 has an odd number of rows ({fc1.shape[0]})")
        gate, up = fc1.chunk(2, dim=0)
        return gate.contiguous(), up.contiguous()

    def to_megatron(self, tensors: Tensors) -> Tensors:
        gate, up = tensors
        return (torch.cat([gate, up], dim=0),)


@dataclass(frozen=True)
class StackExperts:
    """Megatron keeps one tensor per expert (`local_experts.<e>.linear_fc1.weight` [2F, D] or
    [F, D], `linear_fc2.weight` [D, F]); transformers' MoE layout packs them into one 3-D tensor
    with the expert first ([E, 2F, D], [E, F, D], [E, D, F]). A gated fc1 is already [gate; up],
    the order of transformers' concatenated `gate_up_proj`, so the stack is all it takes."""

    num_experts: int

    @property
    def arity(self) -> tuple[int, int]:
        return (self.num_experts, 1)

    def to_hf(self, tensors: Tensors) -> Tensors:
        if len(tensors) != self.num_experts:
            raise ValueError(f"{len(tensors)} expert tensors, expected {self.num_experts}")
        for e, t in enumerate(tensors):
            if t.shape != tensors[0].shape:
                raise ValueError(f"expert {e} has shape {tuple(t.shape)}, expert 0 has "
                                 f"{tuple(tensors[0].shape)}")
        return (torch.stack(tensors, dim=0),)

    def to_megatron(self, tensors: Tensors) -> Tensors:
        (packed,) = tensors
        if packed.shape[0] != self.num_experts:
            raise ValueError(f"packed experts tensor has {packed.shape[0]} experts, expected "
                             f"{self.num_experts}")
        return tuple(t.clone() for t in packed.unbind(0))
