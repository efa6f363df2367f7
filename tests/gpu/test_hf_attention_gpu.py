"""GPU check (skipped without CUDA): the exported model's attention and experts implementations
on CUDA. The attention implementations agree with eager on a left-padded batch and in KV-cache
decoding (flex_attention decoding does not compile on CPU with torch 2.14, so it is checked
here), flash_attention_2 too where the package is installed; the experts implementations agree
with eager in bf16."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

V = 97


def _model(dtype):
    from megatron_dirmoe.hf import DirMoEForCausalLM, DirMoEHFConfig

    config = DirMoEHFConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
        moe_layers=[1, 2], router_target_k=2, router_tau=0.7, shared_expert_intermediate_size=32,
    )
    torch.manual_seed(0)
    model = DirMoEForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "spike_bias"):
                module.spike_bias.normal_(0.0, 1.5)
                module.weight.normal_(0.0, 0.3)
    return model.to("cuda", dtype)


def _batch():
    tokens = torch.randint(0, V, (3, 24), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(tokens)
    mask[0, :7] = 0
    return tokens, mask


def _logits(model, attn, tokens, mask):
    model.set_attn_implementation(attn)
    with torch.no_grad():
        full = model(tokens, attention_mask=mask).logits.float()
        prefill = model(tokens[:, :20], attention_mask=mask[:, :20], use_cache=True)
        step = model(tokens[:, 20:], attention_mask=mask,
                     past_key_values=prefill.past_key_values).logits.float()
    return full, step


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention", "flash_attention_2"])
def test_attention_implementations_agree_on_cuda(attn):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed")
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
    atol = 5e-2 if dtype == torch.bfloat16 else 1e-4  # TF32 / bf16 kernels
    model = _model(dtype)
    tokens, mask = _batch()
    ref_full, ref_step = _logits(model, "eager", tokens, mask)
    full, step = _logits(model, attn, tokens, mask)
    real = mask.bool()
    assert (full - ref_full)[real].abs().max().item() < atol
    assert (step - ref_step)[real[:, 20:]].abs().max().item() < atol


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_experts_implementations_agree_on_cuda(impl):
    model = _model(torch.bfloat16)
    tokens, mask = _batch()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        reference = model(tokens, attention_mask=mask).logits.float()
        model.set_experts_implementation(impl)
        logits = model(tokens, attention_mask=mask).logits.float()
    assert (logits - reference)[mask.bool()].abs().max().item() < 5e-2
