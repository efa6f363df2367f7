"""HF export of checkpoints saved by multi-rank layouts (TP=2 with SP, EP=2, PP=2) on CPU gloo
ranks.

Two ranks build a tiny DirMoE GPT in the layout under test and save a megatron.training-layout
distributed checkpoint; the parent converts it (one rank: `dist_checkpointing.load` reshards to
TP=PP=EP=1) and compares the Hugging Face model's logits with an independent reference:
- TP / EP: the eval-mode logits the ranks computed in their own layout before saving
  (vocab-parallel logits gathered over TP);
- PP: a one-rank model filled by the same rule the pipeline stages used, keyed by *global*
  parameter names (so a wrong layer offset in the stage models or the resharding shows up).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.distributed as dist

from harness import spawn

VOCAB, ITERATION, SEQ = 64, 11, 16
LOGIT_ATOL = 1e-4

_COMMON = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --seq-length 16 --max-position-embeddings 32 --micro-batch-size 1 "
    f"--global-batch-size 2 --lr 1e-3 --train-iters 50 --vocab-size {VOCAB} --num-experts 4 "
    "--moe-ffn-hidden-size 24 --ffn-hidden-size 40 --moe-layer-freq [0,1] --swiglu "
    "--normalization RMSNorm --untie-embeddings-and-output-weights --disable-bias-linear "
    "--position-embedding-type rope --use-cpu-initialization --transformer-impl local "
    "--moe-token-dispatcher-type allgather --dirmoe-target-k 1 --moe-router-topk 4 "
    "--dirmoe-no-torch-compile --tokenizer-type NullTokenizer"
).split()

LAYOUTS = {
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "ep2": ["--expert-model-parallel-size", "2"],
    # Every stage holds a MoE layer: get_dirmoe_decoder_block_spec currently raises for a stage
    # of dense layers only (swap_router finds no MoE layer), e.g. stage 0 of --moe-layer-freq [0,1].
    "pp2": ["--pipeline-model-parallel-size", "2", "--num-layers", "4",
            "--moe-layer-freq", "[0,1,0,1]"],
}


def _randomize(model, rank: int) -> None:
    """Replicated parameters get the same values on every rank; expert shards differ per rank."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            seed = zlib.crc32(name.encode()) + (7919 * rank if ".experts." in name else 0)
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(seed))
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("spike_bias"):
                param.copy_(1.5 * noise)
            else:
                param.copy_(0.1 * noise)


def _global_name(model, name: str) -> str:
    """`decoder.layers.<local i>.` -> `decoder.layers.<global i>.` on a pipeline stage."""
    prefix = "decoder.layers."
    if not name.startswith(prefix):
        return name
    local, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{model.decoder.layers[int(local)].layer_number - 1}.{rest}"


def _fill_by_global_name(model) -> None:
    """Values that depend only on the global parameter name (replicated-only layouts)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            seed = zlib.crc32(_global_name(model, name).encode())
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(seed))
            param.copy_(1.0 + 0.2 * noise if "norm" in name else
                        1.5 * noise if name.endswith("spike_bias") else 0.1 * noise)


def _tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))


def save_layouts(rank: int, world_size: int, root: str) -> dict:
    """Worker: per layout, eval logits in that layout and a checkpoint under root/<layout>."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.training import arguments

    # Test-only: Megatron's argument validation asks the CUDA device for its architecture when
    # TP > 1 (to word a performance warning); these CPU ranks have none.
    arguments.get_device_arch_version = lambda: 0
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # what a TP launch script exports

    from megatron_dirmoe.convert.megatron_checkpoint import (
        build_cpu_model,
        parse_megatron_args,
        save_megatron_checkpoint,
    )
    from megatron_dirmoe.router import set_router_iteration

    logits = {}
    for name, flags in LAYOUTS.items():
        args = parse_megatron_args(_COMMON + flags, world_size=world_size)
        args.padded_vocab_size = VOCAB
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        )
        if args.pipeline_model_parallel_size > 1:
            model = build_cpu_model(
                args, single_rank=False, pre_process=ps.is_pipeline_first_stage(),
                post_process=ps.is_pipeline_last_stage(),
            )
            _fill_by_global_name(model)
            save_megatron_checkpoint(model, args, ITERATION, f"{root}/{name}")
            dist.barrier()
            continue
        model = build_cpu_model(args, single_rank=False)
        _randomize(model, rank)
        model.eval()
        set_router_iteration(model, ITERATION)
        tokens = _tokens()
        with torch.no_grad():
            out = model(tokens, torch.arange(SEQ)[None].expand(2, -1), None)
            out = gather_from_tensor_model_parallel_region(out)  # vocab shards -> [b, s, V]
        logits[name] = out.float()
        save_megatron_checkpoint(model, args, ITERATION, f"{root}/{name}")
        dist.barrier()
    return logits


@pytest.fixture(scope="module")
def multirank(tmp_path_factory):
    root = tmp_path_factory.mktemp("multirank")
    return root, spawn(2, save_layouts, str(root))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_multirank_checkpoint_converts_with_logit_parity(multirank, layout):
    from transformers import AutoModelForCausalLM

    from megatron_dirmoe.convert.hf_export import convert_to_hf

    from megatron_dirmoe.convert.hf_export import megatron_logits
    from megatron_dirmoe.convert.megatron_checkpoint import (
        build_cpu_model,
        read_common_state,
        resolve_checkpoint_dir,
    )
    from megatron_dirmoe.router import set_router_iteration

    root, logits = multirank
    summary = convert_to_hf(root / layout, root / f"{layout}-hf", verify=True)
    if layout not in logits:  # pipeline stages: one-rank reference with the same global fill
        args, _ = read_common_state(resolve_checkpoint_dir(root / layout))
        reference = build_cpu_model(args)
        _fill_by_global_name(reference)
        set_router_iteration(reference.eval(), ITERATION)
        logits[layout] = megatron_logits(reference, _tokens())
    assert logits[layout].shape == (2, SEQ, VOCAB)
    assert summary["max_abs_logit_diff"] <= LOGIT_ATOL  # vs the re-loaded one-rank model
    hf = AutoModelForCausalLM.from_pretrained(
        str(root / f"{layout}-hf"), trust_remote_code=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        hf_logits = hf(_tokens()).logits
    # vs the logits the multi-rank model computed in its own layout before saving
    assert (hf_logits - logits[layout]).abs().max().item() <= LOGIT_ATOL
