"""scripts/vllm_check.py without a GPU: the transformers half (the reference the vLLM output is
compared with) runs on CPU, and without vLLM the script says how to get it and exits 3 (so
scripts/gpu_checks.sh reports the step as not run rather than passed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from user_runs import REPO


def _script():
    spec = importlib.util.spec_from_file_location("vllm_check", REPO / "scripts" / "vllm_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_transformers_greedy_of_the_folder(tmp_path):
    from megatron_dirmoe.convert.hf_export import load_hf_tokenizer
    from megatron_dirmoe.data.tokenizer import default_tokenizer_model
    from megatron_dirmoe.hf import DirMoEForCausalLM, DirMoEHFConfig

    config = DirMoEHFConfig(vocab_size=4096, hidden_size=32, intermediate_size=48,
                            moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                            num_experts=4, router_target_k=1)
    torch.manual_seed(0)
    model = DirMoEForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer = load_hf_tokenizer(default_tokenizer_model())
    tokenizer.save_pretrained(tmp_path)
    script = _script()
    got = script.reference_greedy(str(tmp_path), script.PROMPTS[:2], 5, "float32", "cpu")
    for prompt, ids in zip(script.PROMPTS[:2], got):
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        seq = prompt_ids
        with torch.no_grad():
            for _ in range(5):
                nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
        assert ids == seq[0, prompt_ids.shape[1]:].tolist()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_without_vllm_it_exits_3_with_the_install_hint(capsys):
    assert _script().main(["--model", "/nonexistent"]) == 3
    out = capsys.readouterr().out
    assert "pip install vllm==0.33.0" in out and "transformers>=5.16.1" in out
