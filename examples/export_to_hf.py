#!/usr/bin/env python
"""Train a tiny DirMoE GPT, export it to Hugging Face, load it with `transformers` and generate.

    python examples/export_to_hf.py                  # train the tiny preset (CPU), export, generate
    python examples/export_to_hf.py --checkpoint runs/dirmoe_tiny   # export an existing run instead

1. Train: the `--preset tiny` model (4 layers, 8 experts) on the Shakespeare corpus and
   SentencePiece tokenizer shipped in the package; the same as
   ``dirmoe-pretrain --preset tiny --save <workdir>/run --load <workdir>/run``
   (rerunning resumes from the saved checkpoint; skipped with ``--checkpoint``). Flags this
   script does not know go to ``dirmoe-pretrain``, e.g. ``--num-layers 2``.
2. Export: ``python -m megatron_dirmoe.convert to-hf --load <run> --out <workdir>/hf --verify``,
   which writes the folder with `save_pretrained` (weights, config, generation config), the
   tokenizer (tokenizer.json for `AutoTokenizer`, tokenizer.model for Megatron) and the model
   code, and checks the exported logits against the Megatron model.
3. Use: ``AutoTokenizer`` + ``AutoModelForCausalLM(trust_remote_code=True)``, which need only
   `transformers` and `torch`, then ``generate``; ``--pipeline`` also runs
   ``pipeline("text-generation", ...)`` on the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def train(workdir: Path, train_iters: int | None, extra: list[str]) -> Path:
    """Step 1: pretrain on CPU (or the GPU path when one is present), return the save dir."""
    from megatron_dirmoe.pretrain import main as pretrain

    run = workdir / "run"
    argv = ["--preset", "tiny", "--save", str(run), "--load", str(run)]
    if train_iters is not None:
        argv += ["--train-iters", str(train_iters), "--save-interval", str(train_iters),
                 "--eval-interval", str(train_iters)]
    pretrain(argv + extra)
    return run


def export(checkpoint: Path, out: Path) -> dict:
    """Step 2: Megatron checkpoint -> Hugging Face folder, verified against Megatron's logits."""
    from megatron_dirmoe.convert.hf_export import convert_to_hf

    return convert_to_hf(checkpoint, out, verify=True)


def generate(hf_dir: Path, prompt: str, max_new_tokens: int, use_pipeline: bool) -> str:
    """Step 3: what a user of the exported folder runs (transformers and torch only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    if use_pipeline:
        from transformers import pipeline

        generator = pipeline("text-generation", model=str(hf_dir), trust_remote_code=True)
        piped = generator(prompt, max_new_tokens=max_new_tokens, do_sample=False)
        print("pipeline:", repr(piped[0]["generated_text"]))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/export_to_hf"),
                        help="where the run (<workdir>/run) and the export (<workdir>/hf) go")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="export this Megatron save directory instead of training one")
    parser.add_argument("--out", type=Path, default=None, help="export folder (<workdir>/hf)")
    parser.add_argument("--train-iters", type=int, default=None,
                        help="training steps (default: the preset's 300)")
    parser.add_argument("--prompt", default="ROMEO.\nBut soft, what light")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--pipeline", action="store_true",
                        help="also generate with pipeline('text-generation')")
    args, pretrain_extra = parser.parse_known_args(argv)  # the rest goes to dirmoe-pretrain
    if args.checkpoint is not None and pretrain_extra:
        parser.error(f"unrecognized arguments: {' '.join(pretrain_extra)}")

    checkpoint = args.checkpoint or train(args.workdir, args.train_iters, pretrain_extra)
    hf_dir = args.out or args.workdir / "hf"
    summary = export(checkpoint, hf_dir)
    print(json.dumps({k: summary[k] for k in ("output", "iteration", "max_abs_logit_diff")}))
    text = generate(hf_dir, args.prompt, args.max_new_tokens, args.pipeline)
    print("generated:", repr(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
