"""Hugging Face configuration of a DirMoE causal language model.

Holds the architecture of the Megatron GPT the checkpoint was trained with and the router's
evaluation-time hyperparameters (the temperature frozen at the checkpoint's iteration).
Exported next to every converted checkpoint: imports nothing but `transformers`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import PretrainedConfig

__all__ = ["DirMoEHFConfig"]


class DirMoEHFConfig(PretrainedConfig):
    """Architecture (Megatron GPT with DirMoE layers) plus eval-time DirMoE routing constants.

    Args mirror Megatron's flags: `intermediate_size` is `--ffn-hidden-size` (dense layers),
    `moe_intermediate_size` is `--moe-ffn-hidden-size`, `shared_expert_intermediate_size` is
    `--moe-shared-expert-intermediate-size` (None: no shared expert), `moe_layers` lists the
    0-based indices of the MoE layers (from `--moe-layer-freq`), `normalization` is
    "RMSNorm" or "LayerNorm", `head_dim` is `--kv-channels`. The `router_*` fields are the
    arguments of `routing.route(..., training=False)`; `router_tau` is tau_z at the iteration
    the checkpoint was saved (`router_iteration`). `router_slab` is the recipe's slab posterior
    (`routing.SLABS`: "gate" reads the gate logits, "head" one slab head, "gated" the paper's
    alpha_hi/alpha_lo heads with a bias); `router_logit_heads` is the number of E-row blocks
    stacked in the router weight: 1 + the slab's heads (exports before `router_slab` existed
    have "head" and 2).

    `num_experts_per_tok` is the width of the experts' top-k ids under the name transformers'
    MoE models and the serving engines read: `router_max_active`. A token routed to fewer
    experts fills its remaining slots with weight 0.
    """

    model_type = "dirmoe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 4096,
        moe_intermediate_size: int = 1024,
        shared_expert_intermediate_size: Optional[int] = None,
        shared_expert_gate: bool = False,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 16,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        hidden_act: str = "silu",
        gated_linear_unit: bool = True,
        normalization: str = "RMSNorm",
        norm_eps: float = 1e-5,
        qk_layernorm: bool = False,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        num_experts: int = 8,
        moe_layers: Optional[Sequence[int]] = None,
        router_target_k: int = 1,
        router_tau: float = 0.3,
        router_iteration: int = 0,
        router_posterior_scale: float = 20.0,
        router_alpha_floor: float = 0.005,
        router_alpha_ceiling: float = 1000.0,
        router_leak: float = 1e-3,
        router_threshold: float = 0.125,
        router_max_active: Optional[int] = None,
        router_renormalize: bool = True,
        router_rule: str = "gate",
        router_fallback_k: Optional[int] = None,
        router_logit_heads: int = 2,
        router_slab: str = "head",
        router_unnormalized_weight: str = "posterior-mean",
        num_experts_per_tok: Optional[int] = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.gated_linear_unit = gated_linear_unit
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.qk_layernorm = qk_layernorm
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.num_experts = num_experts
        self.moe_layers = (
            list(range(num_hidden_layers)) if moe_layers is None else sorted(moe_layers)
        )
        self.router_target_k = router_target_k
        self.router_tau = router_tau
        self.router_iteration = router_iteration
        self.router_posterior_scale = router_posterior_scale
        self.router_alpha_floor = router_alpha_floor
        self.router_alpha_ceiling = router_alpha_ceiling
        self.router_leak = router_leak
        self.router_threshold = router_threshold
        self.router_max_active = router_max_active or min(num_experts, 4 * router_target_k)
        self.router_renormalize = router_renormalize
        # `routing.route`'s rule: "gate" (calibrated recipe) or "weight" (paper recipe).
        self.router_rule = router_rule
        # Experts a token gets when no gate passes: k (calibrated recipe) or 1 (paper recipe).
        self.router_fallback_k = router_fallback_k or (
            router_target_k if router_rule == "gate" else 1)
        self.router_logit_heads = router_logit_heads
        self.router_slab = router_slab
        # An active expert's weight without renormalisation (`routing.UNNORMALIZED_WEIGHTS`);
        # exports before the sigmoid weight used the posterior mean share.
        self.router_unnormalized_weight = router_unnormalized_weight
        if num_experts_per_tok not in (None, self.router_max_active):
            raise ValueError(f"num_experts_per_tok={num_experts_per_tok} differs from "
                             f"router_max_active={self.router_max_active}; it is its alias")
        self.num_experts_per_tok = self.router_max_active
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._validate()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _validate(self) -> None:
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(
                f"normalization={self.normalization!r}: allowed 'RMSNorm', 'LayerNorm'"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"moe_layers {bad} outside [0, num_hidden_layers={self.num_hidden_layers})"
            )
        if self.router_rule not in ("gate", "weight"):
            raise ValueError(f"router_rule={self.router_rule!r}: allowed 'gate', 'weight'")
        if self.router_unnormalized_weight not in ("sigmoid", "posterior-mean"):
            raise ValueError(f"router_unnormalized_weight={self.router_unnormalized_weight!r}: "
                             "allowed 'sigmoid', 'posterior-mean'")
        if not 1 <= self.router_fallback_k <= self.router_max_active:
            raise ValueError(f"router_fallback_k={self.router_fallback_k}: allowed "
                             f"1..router_max_active={self.router_max_active}")
        # Slab posterior -> its E-row heads in the router weight (routing.slab_heads; this file
        # also runs inside an export folder, without the package).
        slab_heads = {"gate": 0, "head": 1, "gated": 2}
        if self.router_slab not in slab_heads:
            raise ValueError(f"router_slab={self.router_slab!r}: allowed {sorted(slab_heads)}")
        if self.router_logit_heads != 1 + slab_heads[self.router_slab]:
            raise ValueError(f"router_logit_heads={self.router_logit_heads}: router_slab "
                             f"{self.router_slab!r} stacks {1 + slab_heads[self.router_slab]} "
                             "(the spike head and the slab's)")
        if not 1 <= self.router_max_active <= self.num_experts:
            raise ValueError(
                f"router_max_active={self.router_max_active}: allowed "
                f"1..num_experts={self.num_experts}"
            )
