"""The Hugging Face DirMoE model on its own (transformers + torch, no Megatron): Auto-class
registration, KV-cache decoding equals full recomputation, padding, save/load round trip."""

from __future__ import annotations

import sys

import pytest
import torch

from megatron_dirmoe.hf import DirMoEForCausalLM, DirMoEHFConfig

V = 61


def _model(**overrides) -> DirMoEForCausalLM:
    kwargs = dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
        moe_layers=[1, 2], router_target_k=2, router_tau=0.7, shared_expert_intermediate_size=16,
        shared_expert_gate=True,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = DirMoEForCausalLM(DirMoEHFConfig(**kwargs)).eval()
    with torch.no_grad():  # spread the spike biases so routing picks 1..max_active experts
        for module in model.modules():
            if hasattr(module, "spike_bias"):
                module.spike_bias.normal_(0.0, 1.5)
                module.weight.normal_(0.0, 0.3)
    return model


def test_auto_classes_are_registered():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("dirmoe", vocab_size=V, hidden_size=32, num_attention_heads=4,
                                  num_hidden_layers=1, intermediate_size=16, num_experts=4)
    assert isinstance(config, DirMoEHFConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), DirMoEForCausalLM)


def test_hf_package_imports_without_megatron(tmp_path):
    import subprocess

    code = ("import sys, megatron_dirmoe.hf; "
            "leaked = [m for m in sys.modules if m.split('.')[0] == 'megatron']; "
            "assert not leaked, leaked")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("overrides", [{}, dict(normalization="LayerNorm", qk_layernorm=True,
                                                gated_linear_unit=False, hidden_act="gelu",
                                                tie_word_embeddings=True)])
def test_kv_cache_decoding_equals_full_recompute(overrides):
    model = _model(**overrides)
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        out = model(tokens[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, 12):
            out = model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_left_padded_batch_generates_like_single_rows():
    model = _model()
    rows = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 4)]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, 7 - len(row):] = row
        mask[i, 7 - len(row):] = 1
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                  pad_token_id=0)
        for i, row in enumerate(rows):
            ones = torch.ones(1, len(row), dtype=torch.long)
            alone = model.generate(row[None], attention_mask=ones, max_new_tokens=8,
                                   do_sample=False, pad_token_id=0)
            assert torch.equal(together[i, 7:], alone[0, len(row):])


def test_routing_is_variable_k_and_deterministic():
    model = _model()
    counts = []
    for module in model.modules():
        if type(module).__name__ == "DirMoERouter":
            module.register_forward_hook(lambda m, i, o: counts.append(o[1].sum(-1)))
    tokens = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = model(tokens).logits
        second = model(tokens).logits
    assert torch.equal(first, second)
    k = torch.cat(counts)
    assert k.min() >= 1 and k.max() <= model.config.router_max_active and k.unique().numel() > 1


def test_save_and_reload(tmp_path):
    model = _model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    again = DirMoEForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        # Same weights; loaded (mmap) storage may take another GEMM path: rounding only.
        assert (model(tokens).logits - again(tokens).logits).abs().max().item() < 1e-6
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("overrides", [{}, dict(normalization="LayerNorm", qk_layernorm=True,
                                                gated_linear_unit=False, hidden_act="gelu",
                                                tie_word_embeddings=True)])
def test_greedy_generate_equals_recompute_loop(overrides):
    """`generate()` (KV cache handed back and forth under the installed transformers' cache
    name) gives the tokens of a loop that recomputes the whole sequence without a cache."""
    model = _model(**overrides)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=10, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(10):
            next_token = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(generated, seq)


def test_cache_is_returned_under_the_transformers_field_name():
    from dataclasses import fields

    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from megatron_dirmoe.hf.modeling_dirmoe import CACHE_FIELD

    assert CACHE_FIELD in {f.name for f in fields(CausalLMOutputWithPast)}
    model = _model()
    tokens = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(tokens[:, :4], use_cache=True)
        cache = out[CACHE_FIELD]
        assert isinstance(cache, Cache) and cache.get_seq_length() == 4
        step = model(tokens[:, 4:], **{CACHE_FIELD: cache}).logits
        full = model(tokens, use_cache=False).logits
        with pytest.raises(ValueError, match="KV cache once"):
            model(tokens[:, 5:], cache=cache, past_key_values=cache)
    assert (step - full[:, 4:]).abs().max().item() < 1e-5


def test_labels_give_the_transformers_causal_lm_loss():
    import torch.nn.functional as F

    model = _model()
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(8))
    labels = tokens.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(tokens, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)


# ---------------------------------------------------------------------- transformers' seams
def _left_padded_batch():
    tokens = torch.randint(0, V, (3, 14), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    mask[2, :2] = 0
    return tokens, mask


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_attention_implementations_agree_with_eager(attn):
    """`attn_implementation` really selects the attention (eager is not SDPA in disguise): the
    same logits to 1e-5 in fp32 on a left-padded batch and in KV-cache decoding, from masks built
    by transformers for each implementation. (flex_attention decoding with a KV cache does not
    compile on CPU with torch 2.14's inductor, for transformers' own Llama too: checked on the
    GPU, tests/gpu/test_hf_attention_gpu.py.)"""
    model = _model()
    tokens, mask = _left_padded_batch()
    calls = []
    with torch.no_grad():
        model.set_attn_implementation("eager")
        hook = model.model.layers[0].self_attn.register_forward_hook(
            lambda m, i, o: calls.append(o[1] is not None))  # eager returns the probabilities
        reference = model(tokens, attention_mask=mask).logits
        hook.remove()
        model.set_attn_implementation(attn)
        assert model.config._attn_implementation == attn
        logits = model(tokens, attention_mask=mask).logits
        if attn != "flex_attention":
            prefill = model(tokens[:, :9], attention_mask=mask[:, :9], use_cache=True)
            step = model(tokens[:, 9:], attention_mask=mask,
                         past_key_values=prefill.past_key_values).logits
    assert calls == [True]
    real = mask.bool()
    assert (logits - reference)[real].abs().max().item() < 1e-5
    if attn != "flex_attention":
        assert (step - reference[:, 9:])[real[:, 9:]].abs().max().item() < 1e-5


def test_attention_goes_through_the_registered_interface():
    """What a serving engine does (vLLM's and SGLang's Transformers backends register their own
    attention in `ALL_ATTENTION_FUNCTIONS` and set `_attn_implementation`): the model calls it
    from every layer, with the module (its `layer_idx`, `scaling`) and [B, H, S, d] tensors."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = []

    def engine_attention(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, kwargs["scaling"], tuple(query.shape), tuple(key.shape)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("dirmoe_test_engine", engine_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("dirmoe_test_engine", sdpa_mask)
    model = _model()
    tokens = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        reference = model(tokens).logits
        model.config._attn_implementation = "dirmoe_test_engine"
        logits = model(tokens).logits
    assert [s[0] for s in seen] == [0, 1, 2]
    assert {s[1:] for s in seen} == {(8 ** -0.5, (2, 4, 7, 8), (2, 2, 7, 8))}
    assert (logits - reference).abs().max().item() < 1e-6
    assert type(model).is_backend_compatible() and type(model)._can_set_attn_implementation()


def _reference_moe(block, x_TD):
    """The MoE layer token by token: sum over the routed experts of prob * expert(x)."""
    probs_TE, map_TE = block.router(x_TD)
    experts = block.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for e in map_TE[t].nonzero().flatten().tolist():
            gate, up = (x_TD[t] @ experts.gate_up_proj[e].T).chunk(2)
            out[t] += probs_TE[t, e] * (experts.act_fn(gate) * up) @ experts.down_proj[e].T
    return out


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_experts_implementations_agree_with_a_token_by_token_reference(impl):
    """Packed experts behind transformers' experts interface: each implementation it offers
    gives the routed experts' weighted sum, for tokens routed to different numbers of experts."""
    model = _model(shared_expert_intermediate_size=None)
    model.set_experts_implementation(impl)
    assert model.config._experts_implementation == impl
    block = model.model.layers[1].mlp
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        counts = block.router(x)[1].sum(-1)
        got = block(x[None])[0]
        want = _reference_moe(block, x)
    # Variable k, and padded slots: every token has fewer experts than the width (6).
    assert counts.unique().numel() >= 3 and counts.max() < model.config.num_experts_per_tok
    assert (got - want).abs().max().item() < 1e-5


def test_variable_k_becomes_fixed_width_top_k_with_zero_padding():
    from megatron_dirmoe.hf.modeling_dirmoe import _fixed_width_top_k

    probs = torch.tensor([[0.0, 0.7, 0.0, 0.3], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    index, weights = _fixed_width_top_k(probs, probs > 0, width=3)
    assert index.tolist() == [[1, 3, 1], [0, 0, 0], [3, 2, 1]]
    assert torch.equal(weights, torch.tensor([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0], [0.4, 0.3, 0.2]]))
    # The slots add back up to the routing: sum_m w_tm onehot(i_tm) = probs (top-3 of row 2).
    rebuilt = torch.zeros_like(probs).scatter_add_(1, index, weights)
    assert torch.equal(rebuilt[:2], probs[:2])


def test_experts_get_fixed_width_in_range_ids():
    """The experts module receives what transformers' kernels and vLLM's fused MoE need:
    [T, num_experts_per_tok] ids in [0, E) and weights that are 0 on padded slots."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    seen = []

    def engine_experts(module, hidden, top_k_index, top_k_weights):
        seen.append((top_k_index.clone(), top_k_weights.clone()))
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](module, hidden, top_k_index, top_k_weights)

    ALL_EXPERTS_FUNCTIONS.register("dirmoe_test_engine", engine_experts)
    model = _model()
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        reference = model(tokens).logits
        model.config._experts_implementation = "dirmoe_test_engine"
        logits = model(tokens).logits
    assert len(seen) == len(model.config.moe_layers)
    for index, weights in seen:
        assert index.shape == weights.shape == (18, model.config.num_experts_per_tok)
        assert index.min() >= 0 and index.max() < model.config.num_experts
        real = weights > 0
        assert real[:, 0].all() and ((weights == 0) == ~real).all()
        assert torch.allclose(weights.sum(-1), torch.ones(18))  # renormalised over the active set
    assert (logits - reference).abs().max().item() < 1e-6


def test_serving_engine_view_of_the_model():
    """What vLLM's Transformers backend reads (vllm/model_executor/models/transformers/ in vLLM
    0.33 and 0.34): `AutoModel` in auto_map, the backend flag, MoE config fields under its
    alias names, an `experts` child holding 3-D parameters only, one attention-interface call
    with `scaling=`, and the base model's first output when called with return_dict=False."""
    import inspect

    from megatron_dirmoe.hf import AUTO_MAP, DirMoEModel
    from megatron_dirmoe.hf.modeling_dirmoe import DirMoEAttention

    assert list(AUTO_MAP)[:2] == ["AutoConfig", "AutoModel"]
    assert DirMoEModel.is_backend_compatible()
    model = _model()
    config = model.config
    assert config.num_experts == 6 and config.num_experts_per_tok == config.router_max_active
    assert config.moe_intermediate_size == 24 and config.head_dim == 8
    block = model.model.layers[1].mlp
    assert all(p.ndim == 3 for p in block.experts.parameters())
    assert "shared_expert" in dict(block.named_children())
    source = inspect.getsource(DirMoEAttention.forward)
    assert source.count("ALL_ATTENTION_FUNCTIONS.get_interface(") == 1
    assert source.count("attention_interface(") == 1 and "scaling=self.scaling" in source
    tokens = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        out = model.model(input_ids=tokens, position_ids=torch.arange(5)[None], use_cache=False,
                          return_dict=False)
        assert isinstance(out, tuple)
        assert torch.equal(out[0], model.model(tokens, use_cache=False).last_hidden_state)


def test_bf16_load_keeps_the_router_in_fp32(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    again = DirMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    router = again.model.layers[1].mlp.router
    assert router.weight.dtype == router.spike_bias.dtype == torch.float32
    assert again.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(router.weight, model.model.layers[1].mlp.router.weight)
