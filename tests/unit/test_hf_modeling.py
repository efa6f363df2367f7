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
