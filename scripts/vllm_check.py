#!/usr/bin/env python
"""Serve an exported DirMoE model with vLLM's Transformers backend and check that its greedy
output equals transformers' own, token for token.

    python scripts/vllm_check.py --model hf_model            # on a GPU, with vllm installed

vLLM runs the export's own modeling code (``model_impl="transformers"``, ``trust_remote_code``):
its attention through the attention interface, its routed experts replaced by vLLM's fused MoE
fed with the model's fixed-width top-k ids. transformers' reference is `generate()` of the same
folder on the same device and dtype. Exit status 0 when every prompt's `--tokens` greedy tokens
agree, 1 when one differs, 3 when vLLM is not installed (vLLM 0.33 / 0.34 need
transformers >= 5.16.1, < 5.21 / < 5.23, and pin torch 2.14.0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = ("ROMEO.\n", "To be, or not to be,", "KING HENRY.\nOnce more unto the breach, dear",
           "The quality of mercy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported Hugging Face folder")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="both engines' dtype (float32: no rounding-driven ties)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None, help="also write the tokens and verdict here")
    return parser


def reference_greedy(model_dir: str, prompts, tokens: int, dtype: str, device: str):
    """transformers' greedy continuation ids of every prompt (exactly `tokens` new tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=getattr(torch, dtype)).to(device).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=tokens, min_new_tokens=tokens,
                                 pad_token_id=tokenizer.pad_token_id or 0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def vllm_greedy(model_dir: str, prompts, tokens: int, dtype: str):
    """vLLM's greedy continuation ids through its Transformers backend."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, model_impl="transformers", trust_remote_code=True, dtype=dtype,
              seed=0, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens,
                            ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(list(prompts), params)]


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        import vllm
    except ImportError:
        print("vllm is not installed: pip install vllm==0.33.0 (or 0.34.0) on a GPU machine; "
              "it pins torch==2.14.0 and needs transformers>=5.16.1,<5.21 (0.34: <5.23)")
        return 3
    reference = reference_greedy(opts.model, PROMPTS, opts.tokens, opts.dtype, opts.device)
    served = vllm_greedy(opts.model, PROMPTS, opts.tokens, opts.dtype)
    same = [r == s for r, s in zip(reference, served)]
    print(f"vllm {vllm.__version__}, model_impl=transformers, dtype {opts.dtype}, "
          f"{opts.tokens} greedy tokens per prompt")
    for prompt, ok, r, s in zip(PROMPTS, same, reference, served):
        print(f"  {prompt!r}: {'same' if ok else 'DIFFERENT'}"
              + ("" if ok else f"\n    transformers {r}\n    vllm         {s}"))
    if opts.json:
        Path(opts.json).write_text(json.dumps(dict(vllm=vllm.__version__, prompts=PROMPTS,
                                                   transformers=reference, vllm_ids=served,
                                                   same=same), indent=2))
    print("greedy outputs equal" if all(same) else "greedy outputs differ")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
