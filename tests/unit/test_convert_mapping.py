"""The conversion table and its transforms (torch + transformers only, no Megatron).

Every Megatron name is consumed by exactly one rule and every HF name produced by exactly one;
the expanded HF names are exactly the parameters of `DirMoEForCausalLM`; every transform is an
exact inverse; bad checkpoints are refused with the tensor's name.
"""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from megatron_dirmoe.convert.mapping import (
    TABLE,
    ConversionError,
    expand,
    hf_to_megatron,
    layout_from_hf_config,
    megatron_to_hf,
)
from megatron_dirmoe.convert.transforms import (
    AttentionDims,
    SplitGatedFC1,
    SplitQKV,
    StackExperts,
)
from megatron_dirmoe.hf import DirMoEForCausalLM, DirMoEHFConfig

H, HEADS, HEAD_DIM, FFN, MOE_FFN, SHARED_FFN, E, V = 32, 4, 8, 40, 24, 16, 4, 50

# Architecture variants: (normalization, kv heads, gated, qk norm, tied, moe layers, shared, gate)
VARIANTS = [
    ("RMSNorm", 2, True, False, False, [1, 2], True, True),
    ("LayerNorm", 4, False, True, True, [0, 1, 2], False, False),
    ("RMSNorm", 1, True, True, False, [0], True, False),
]


def _config(variant) -> DirMoEHFConfig:
    norm, kv, gated, qk, tied, moe_layers, shared, gate = variant
    return DirMoEHFConfig(
        vocab_size=V, hidden_size=H, intermediate_size=FFN, moe_intermediate_size=MOE_FFN,
        shared_expert_intermediate_size=SHARED_FFN if shared else None, shared_expert_gate=gate,
        num_hidden_layers=3, num_attention_heads=HEADS, num_key_value_heads=kv, head_dim=HEAD_DIM,
        hidden_act="silu" if gated else "gelu", gated_linear_unit=gated, normalization=norm,
        qk_layernorm=qk, num_experts=E, moe_layers=moe_layers, tie_word_embeddings=tied,
    )


def _megatron_shapes(cfg: DirMoEHFConfig) -> dict[str, tuple[int, ...]]:
    """Global shapes of the one-rank Megatron GPT for `cfg`, written independently of the table
    from Megatron's layer definitions."""
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    fc1 = 2 if cfg.gated_linear_unit else 1
    norm = ["weight"] + (["bias"] if cfg.normalization == "LayerNorm" else [])
    shapes = {"embedding.word_embeddings.weight": (V, H)}
    shapes.update({f"decoder.final_layernorm.{p}": (H,) for p in norm})
    if not cfg.tie_word_embeddings:
        shapes["output_layer.weight"] = (V, H)
    for i in range(cfg.num_hidden_layers):
        p = f"decoder.layers.{i}."
        for n in ("input_layernorm", "pre_mlp_layernorm"):
            shapes.update({f"{p}{n}.{q}": (H,) for q in norm})
        shapes[p + "self_attention.linear_qkv.weight"] = (qkv_rows, H)
        shapes[p + "self_attention.linear_proj.weight"] = (
            H, cfg.num_attention_heads * cfg.head_dim)
        if cfg.qk_layernorm:
            for n in ("q_layernorm", "k_layernorm"):
                shapes.update({f"{p}self_attention.{n}.{q}": (cfg.head_dim,) for q in norm})
        if i in cfg.moe_layers:
            shapes[p + "mlp.router.weight"] = (2 * E, H)
            shapes[p + "mlp.router.spike_bias"] = (E,)
            for e in range(E):
                shapes[f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight"] = (fc1 * MOE_FFN, H)
                shapes[f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight"] = (H, MOE_FFN)
            if cfg.shared_expert_intermediate_size:
                shapes[p + "mlp.shared_experts.linear_fc1.weight"] = (fc1 * SHARED_FFN, H)
                shapes[p + "mlp.shared_experts.linear_fc2.weight"] = (H, SHARED_FFN)
                if cfg.shared_expert_gate:
                    shapes[p + "mlp.shared_experts.gate_weight"] = (1, H)
        else:
            shapes[p + "mlp.linear_fc1.weight"] = (fc1 * FFN, H)
            shapes[p + "mlp.linear_fc2.weight"] = (H, FFN)
    return shapes


def _hf_shapes(cfg: DirMoEHFConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = DirMoEForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _random_state(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.mark.parametrize("variant", VARIANTS, ids=["rms_gqa_shared", "ln_tied_qknorm", "mqa_moe0"])
def test_every_name_used_once_and_matches_both_models(variant):
    cfg = _config(variant)
    mappings = expand(layout_from_hf_config(cfg))
    source = collections.Counter(n for m in mappings for n in m.megatron)
    target = collections.Counter(n for m in mappings for n in m.hf)
    assert max(source.values()) == 1, [n for n, c in source.items() if c > 1]
    assert max(target.values()) == 1, [n for n, c in target.items() if c > 1]
    assert set(source) == set(_megatron_shapes(cfg))
    assert set(target) == set(_hf_shapes(cfg))


@pytest.mark.parametrize("variant", VARIANTS, ids=["rms_gqa_shared", "ln_tied_qknorm", "mqa_moe0"])
def test_state_round_trip_is_exact(variant):
    cfg = _config(variant)
    layout = layout_from_hf_config(cfg)
    megatron = _random_state(_megatron_shapes(cfg))
    hf = megatron_to_hf(megatron, layout, _hf_shapes(cfg))
    assert {k: tuple(v.shape) for k, v in hf.items()} == _hf_shapes(cfg)
    back = hf_to_megatron(hf, layout, _megatron_shapes(cfg))
    assert back.keys() == megatron.keys()
    for name in megatron:
        assert torch.equal(back[name], megatron[name]), name


def test_no_rule_has_two_sources_for_one_target():
    """Across all feature combinations, a target name template comes from one rule."""
    features = ["norm_bias", "qk_norm", "untied", "shared_expert", "shared_expert_gate"]
    for combo in itertools.product([False, True], repeat=len(features)):
        present = {f for f, on in zip(features, combo) if on}
        for gated in ("gated", "ungated"):
            rules = [r for r in TABLE if set(r.requires) <= present | {gated}]
            targets = collections.Counter(t for r in rules for t in r.hf)
            assert max(targets.values()) == 1


def test_split_qkv_matches_megatron_group_layout():
    """Rows of group g are [q_(g,0..Q-1), k_g, v_g]: build that layout by hand and split it."""
    dims = AttentionDims(num_heads=6, num_query_groups=2, head_dim=3)
    q = torch.arange(6 * 3 * 5, dtype=torch.float32).view(18, 5)
    k = 1000 + torch.arange(2 * 3 * 5, dtype=torch.float32).view(6, 5)
    v = 2000 + torch.arange(2 * 3 * 5, dtype=torch.float32).view(6, 5)
    fused = torch.cat([q[0:9], k[0:3], v[0:3], q[9:18], k[3:6], v[3:6]])
    split = SplitQKV(dims)
    for got, want in zip(split.to_hf((fused,)), (q, k, v)):
        assert torch.equal(got, want)
    assert torch.equal(split.to_megatron((q, k, v))[0], fused)
    bias = torch.arange(30.0)  # 1-D tensors (biases) take the same path
    assert torch.equal(split.to_megatron(split.to_hf((bias,)))[0], bias)


def test_split_gated_fc1_is_gate_then_up():
    fc1 = torch.randn(8, 3)
    gate, up = SplitGatedFC1().to_hf((fc1,))
    assert torch.equal(gate, fc1[:4]) and torch.equal(up, fc1[4:])
    assert torch.equal(SplitGatedFC1().to_megatron((gate, up))[0], fc1)


def test_refuses_missing_unexpected_and_misshaped_tensors():
    cfg = _config(VARIANTS[0])
    layout = layout_from_hf_config(cfg)
    shapes = _megatron_shapes(cfg)
    state = _random_state(shapes)

    missing = dict(state)
    del missing["decoder.layers.1.mlp.router.spike_bias"]
    name = r"missing \['decoder\.layers\.1\.mlp\.router\.spike_bias'\]"
    with pytest.raises(ConversionError, match=name):
        megatron_to_hf(missing, layout)

    unexpected = dict(state, **{"decoder.layers.0.mlp.router.weight": torch.zeros(2 * E, H)})
    name = r"unexpected \['decoder\.layers\.0\.mlp\.router\.weight'\]"
    with pytest.raises(ConversionError, match=name):
        megatron_to_hf(unexpected, layout)

    wrong = dict(state)
    fc2 = "decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight"
    wrong[fc2] = torch.zeros(H, MOE_FFN + 1)
    with pytest.raises(ConversionError, match=r"local_experts\.3\.linear_fc2\.weight.*expert 3 "
                       r"has shape \(32, 25\), expert 0 has \(32, 24\)"):
        megatron_to_hf(wrong, layout, _hf_shapes(cfg))

    bad_qkv = dict(state)
    bad_qkv["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.zeros(7, H)
    with pytest.raises(ConversionError, match=r"decoder.layers.0.self_attention.linear_qkv.weight"):
        megatron_to_hf(bad_qkv, layout, _hf_shapes(cfg))


def test_stack_experts_packs_in_expert_order_and_unpacks_exactly():
    per_expert = tuple(torch.full((6, 3), float(e)) + torch.randn(6, 3) for e in range(4))
    (packed,) = StackExperts(4).to_hf(per_expert)
    assert packed.shape == (4, 6, 3)
    for e in range(4):
        assert torch.equal(packed[e], per_expert[e])
    back = StackExperts(4).to_megatron((packed,))
    assert all(torch.equal(a, b) for a, b in zip(back, per_expert))
    assert back[0].untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="3 experts, expected 4"):
        StackExperts(4).to_megatron((packed[:3],))


def test_packed_gate_up_is_gate_first_as_transformers_reads_it():
    """Megatron's gated fc1 rows are [gate; up]: stacked, transformers' experts forward (its
    `_apply_gate` splits `gate_up_proj` output in halves, activation on the first) computes
    act(gate x) * (up x), as Megatron's GLU does."""
    from megatron_dirmoe.hf.modeling_dirmoe import DirMoEExperts

    cfg = _config(VARIANTS[0])
    experts = DirMoEExperts(cfg)
    fc1 = [torch.randn(2 * MOE_FFN, H) for _ in range(E)]
    fc2 = [torch.randn(H, MOE_FFN) for _ in range(E)]
    with torch.no_grad():
        experts.gate_up_proj.copy_(StackExperts(E).to_hf(tuple(fc1))[0])
        experts.down_proj.copy_(StackExperts(E).to_hf(tuple(fc2))[0])
    x = torch.randn(5, H)
    e = 2
    gate, up = fc1[e][:MOE_FFN], fc1[e][MOE_FFN:]
    want = torch.nn.functional.silu(x @ gate.T) * (x @ up.T) @ fc2[e].T
    transformers_gate = experts._apply_gate(x @ experts.gate_up_proj[e].T)
    assert torch.allclose(transformers_gate @ experts.down_proj[e].T, want, atol=1e-5)
