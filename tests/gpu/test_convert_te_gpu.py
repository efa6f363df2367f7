"""GPU check (skipped without CUDA + Transformer Engine): a checkpoint saved from the TE spec
(fused layer norms in linear_qkv / linear_fc1, separate TENorm before MoE, TEGroupedMLP experts
with grouped GEMM) converts to Hugging Face with logit parity against the TE model in fp32."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB, ITERATION, SEQ = 128, 9, 32
# TE may run fp32 GEMMs through TF32 on Hopper; the CPU tests hold 1e-4 in strict fp32.
LOGIT_ATOL = 2e-3

ARGV = (
    "--num-layers 3 --hidden-size 128 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --seq-length 32 --max-position-embeddings 64 --micro-batch-size 1 "
    f"--global-batch-size 1 --lr 1e-3 --train-iters 40 --vocab-size {VOCAB} --num-experts 8 "
    "--moe-ffn-hidden-size 64 --ffn-hidden-size 192 --moe-layer-freq [0,1,1] --swiglu "
    "--normalization RMSNorm --untie-embeddings-and-output-weights --disable-bias-linear "
    "--position-embedding-type rope --transformer-impl transformer_engine --moe-grouped-gemm "
    "--moe-token-dispatcher-type alltoall --dirmoe-target-k 2 --moe-router-topk 8 "
    "--moe-shared-expert-intermediate-size 64 --tokenizer-type NullTokenizer --no-rope-fusion"
).split()


@pytest.mark.parametrize("grouped_gemm", [True, False])
def test_te_checkpoint_converts_with_logit_parity(megatron_single_rank, tmp_path, grouped_gemm):
    pytest.importorskip("transformer_engine")
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training.argument_utils import core_transformer_config_from_args
    from transformers import AutoModelForCausalLM

    from megatron_dirmoe.convert.hf_export import convert_to_hf
    from megatron_dirmoe.convert.megatron_checkpoint import (
        dirmoe_config_from_args,
        parse_megatron_args,
        save_megatron_checkpoint,
    )
    from megatron_dirmoe.model import build_gpt_model
    from megatron_dirmoe.router import set_router_iteration

    model_parallel_cuda_manual_seed(1234)
    argv = ARGV if grouped_gemm else [a for a in ARGV if a != "--moe-grouped-gemm"]
    args = parse_megatron_args(argv)
    args.padded_vocab_size = VOCAB
    config = core_transformer_config_from_args(args)
    model = build_gpt_model(config, dirmoe_config_from_args(args), vocab_size=VOCAB,
                            max_sequence_length=64, use_te=True,
                            share_embeddings_and_output_weights=False).cuda()
    assert "TE" in type(model.decoder.layers[0].self_attention.linear_qkv).__name__
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen).to(param)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("spike_bias"):
                param.copy_(1.5 * noise)
            else:
                param.copy_(0.08 * noise)
    model.eval()
    set_router_iteration(model, ITERATION)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens.cuda(), torch.arange(SEQ, device="cuda")[None].expand(2, -1),
                          None).float().cpu()

    save_megatron_checkpoint(model, args, ITERATION, tmp_path / "ckpt")
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", verify=True)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(tokens).logits
    diff = (logits - reference).abs().max().item()
    print(f"TE (grouped_gemm={grouped_gemm}) vs HF max |logit diff| = {diff:.3e}")
    assert diff <= LOGIT_ATOL
