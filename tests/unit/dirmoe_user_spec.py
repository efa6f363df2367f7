"""A user's layer spec for the ``--spec`` tests (tests/unit/test_model_flags.py): Megatron's
local MoE layer spec with a marker module as the final layer norm of every MoE layer's MLP
input, the way a user ships a spec module of their own."""

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

import torch


class MarkedRMSNorm(torch.nn.RMSNorm):
    """RMSNorm that a test can find in the built model."""

    def __init__(self, config, hidden_size, eps=1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)


spec = get_gpt_layer_local_spec(num_experts=4, normalization="RMSNorm")
spec.submodules.pre_mlp_layernorm = MarkedRMSNorm


def spec_for(config):
    """The same as a function of the TransformerConfig (Megatron-Bridge style)."""
    return spec
