"""Megatron checkpoint -> Hugging Face folder, end to end on CPU.

A tiny random DirMoE GPT is saved as a megatron.training-layout distributed checkpoint, converted
(once through the CLI in a fresh process, once in-process), and loaded with `transformers`
(`trust_remote_code=True`): logits match the Megatron model in eval mode, greedy generation with
the KV cache matches a full-recompute greedy loop over the Megatron model, the folder loads in a
fresh process without Megatron, and HF -> Megatron gives back the exact weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VOCAB, ITERATION, TRAIN_ITERS = 96, 37, 100
LOGIT_ATOL = 1e-4
REPO = Path(__file__).resolve().parents[2]

_COMMON = (
    "--num-layers 3 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 2 --lr 1e-3 "
    f"--train-iters {TRAIN_ITERS} --vocab-size {VOCAB} --num-experts 8 --moe-ffn-hidden-size 32 "
    "--ffn-hidden-size 80 --moe-token-dispatcher-type allgather --disable-bias-linear "
    "--position-embedding-type rope --use-cpu-initialization --transformer-impl local "
    "--dirmoe-target-k 2 --moe-router-topk 8 --dirmoe-no-torch-compile"
).split()

ARCHS = {
    # RMSNorm, GQA, SwiGLU, dense first layer (--moe-layer-freq), gated shared expert, untied
    # head, SentencePiece tokenizer; converted by the CLI in a fresh process, 3+ shards.
    "rms_gqa_freq_shared": [
        "--normalization", "RMSNorm", "--group-query-attention", "--num-query-groups", "2",
        "--swiglu", "--moe-layer-freq", "[0,1,1]", "--untie-embeddings-and-output-weights",
        "--moe-shared-expert-intermediate-size", "48", "--moe-shared-expert-gate",
        "--rotary-base", "5000", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", "@spm",
    ],
    # LayerNorm (with biases), MHA, QK LayerNorm, plain GELU MLP, MoE in every layer, tied
    # embeddings; converted in-process.
    # The paper recipe's routing rule (threshold on the combined weight).
    "ln_mha_qknorm_tied_gelu": [
        "--normalization", "LayerNorm", "--qk-layernorm", "--tokenizer-type", "NullTokenizer",
        "--dirmoe-recipe", "paper",
    ],
}


def _randomize(model) -> None:
    """Weights far from Megatron's init (norm gains != 1, spike biases spread), so a swapped or
    mis-split tensor changes the logits; the routing then activates 1..max_active experts."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("spike_bias"):
                # Centred below 0 so that under the calibrated rule (gate on when l >= 0) some
                # tokens open one gate and others several.
                param.copy_(1.5 * noise - 2.0)
            else:
                param.copy_(0.08 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith(("count_bias", "load_bias")):  # the controllers' c and b: folded
                buffer.copy_(0.5 * torch.randn(buffer.shape, generator=gen))  # into the bias


def _megatron_logits(model, tokens):
    from megatron_dirmoe.convert.hf_export import megatron_logits

    return megatron_logits(model, tokens)


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, megatron_single_rank, tmp_path_factory):
    """(Megatron model in eval mode at ITERATION, its args, HF folder, converter summary)."""
    from megatron_dirmoe.convert.hf_export import convert_to_hf
    from megatron_dirmoe.convert.megatron_checkpoint import (
        build_cpu_model,
        parse_megatron_args,
        save_megatron_checkpoint,
    )
    from megatron_dirmoe.data.tokenizer import default_tokenizer_model
    from megatron_dirmoe.router import set_router_iteration

    name = request.param
    argv = [str(default_tokenizer_model()) if a == "@spm" else a for a in ARCHS[name]]
    args = parse_megatron_args(_COMMON + argv)
    args.padded_vocab_size = VOCAB  # set by megatron.training's tokenizer build
    torch.manual_seed(0)
    model = build_cpu_model(args)
    _randomize(model)

    tmp = tmp_path_factory.mktemp(name)
    save_megatron_checkpoint(model, args, ITERATION, tmp / "ckpt")

    out = tmp / "hf"
    if name == "rms_gqa_freq_shared":
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "convert_to_hf.py"),
             "--load", str(tmp / "ckpt"), "--out", str(out), "--verify",
             "--max-shard-size", "150KB"],
            capture_output=True, text=True, timeout=300, cwd=tmp,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    else:
        summary = convert_to_hf(tmp / "ckpt", out, verify=True)

    model.eval()
    set_router_iteration(model, ITERATION)
    return name, model, args, out, summary


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, dtype=torch.float32
    ).eval()


def _tokens(batch=3, length=24, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_folder_contents_and_config(exported):
    from megatron_dirmoe.config import dirmoe_config_from_args
    from megatron_dirmoe.schedules import temperature_at

    name, model, args, out, summary = exported
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "modeling_dirmoe.py",
            "configuration_dirmoe.py", "dirmoe_routing.py"} <= files
    # The routing math travels verbatim.
    routing_source = (REPO / "megatron_dirmoe" / "routing.py").read_bytes()
    assert (out / "dirmoe_routing.py").read_bytes() == routing_source
    config = json.loads((out / "config.json").read_text())
    dcfg = dirmoe_config_from_args(args, 8).with_schedule_horizon(TRAIN_ITERS)
    assert config["model_type"] == "dirmoe"
    assert config["router_iteration"] == ITERATION == summary["iteration"]
    assert config["router_tau"] == pytest.approx(temperature_at(dcfg, ITERATION))
    assert config["router_tau"] < dcfg.tau_start  # the schedule moved: not the step-0 value
    assert config["router_max_active"] == dcfg.max_active_for(8) == 8
    assert config["router_threshold"] == dcfg.route_threshold
    assert config["router_rule"] == dcfg.routing_rule
    assert config["router_fallback_k"] == dcfg.fallback_k
    assert dcfg.recipe == ("calibrated" if name == "rms_gqa_freq_shared" else "paper")
    # Written by transformers' save_pretrained: shards + index when sharded, else one file.
    from safetensors import safe_open

    shards = sorted(out.glob("*.safetensors"))
    saved = set()
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            saved |= set(f.keys())
    # transformers' MoE layout: packed [E, ...] experts, fixed-width top-k under its name.
    assert config["num_experts_per_tok"] == config["router_max_active"]
    # The router's heads stay stacked: the calibrated recipe's slab reads the gate logits (one
    # head), the paper's has alpha_hi and alpha_lo heads with a bias (three heads).
    assert config["router_slab"] == dcfg.slab == ("gate" if name == "rms_gqa_freq_shared"
                                                  else "gated")
    assert config["router_logit_heads"] == (1 if dcfg.slab == "gate" else 3)
    slab_bias = f"model.layers.{config['moe_layers'][0]}.mlp.router.slab_bias"
    assert (slab_bias in saved) == (dcfg.slab == "gated")
    first_moe = config["moe_layers"][0]
    expert_tensors = {k for k in saved if k.startswith(f"model.layers.{first_moe}.mlp.experts.")}
    gated = name == "rms_gqa_freq_shared"
    assert expert_tensors == {f"model.layers.{first_moe}.mlp.experts.{t}"
                              for t in (("gate_up_proj" if gated else "up_proj"), "down_proj")}
    if len(shards) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {p.name for p in shards}
        assert set(index["weight_map"]) == saved
    else:
        assert [p.name for p in shards] == ["model.safetensors"]
    if name == "rms_gqa_freq_shared":
        assert config["moe_layers"] == [1, 2] and config["num_key_value_heads"] == 2
        assert config["rope_theta"] == 5000.0 and not config["tie_word_embeddings"]
        assert len(shards) >= 3  # --max-shard-size 150KB
        assert "lm_head.weight" in saved
        # SentencePiece: kept for Megatron, and as tokenizer.json + config for AutoTokenizer.
        assert (out / "tokenizer.model").read_bytes() == Path(args.tokenizer_model).read_bytes()
        assert {"tokenizer.json", "tokenizer_config.json"} <= files
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    else:
        assert config["moe_layers"] == [0, 1, 2] and config["tie_word_embeddings"]
        assert "lm_head.weight" not in saved
        assert not {"tokenizer.json", "tokenizer.model"} & files  # NullTokenizer: none


def test_converter_verified_logits(exported):
    *_, summary = exported
    assert summary["max_abs_logit_diff"] <= LOGIT_ATOL


def test_logits_match_megatron_eval(exported):
    _, model, _, out, _ = exported
    hf = _load_hf(out)
    active = []
    for module in hf.modules():
        if type(module).__name__ == "DirMoERouter":
            module.register_forward_hook(lambda m, i, o: active.append(o[1].sum(-1)))
    tokens = _tokens()
    with torch.no_grad():
        logits = hf(tokens).logits
    reference = _megatron_logits(model, tokens)
    assert (logits - reference).abs().max().item() <= LOGIT_ATOL
    # The comparison exercises variable k: tokens with one expert and tokens with several.
    counts = torch.cat(active)
    assert counts.min() == 1 and counts.max() >= 3


def test_greedy_generation_matches_megatron_loop(exported):
    _, model, _, out, _ = exported
    hf = _load_hf(out)
    hf.generation_config.eos_token_id = None  # the Megatron loop below has no stop token
    prompt = _tokens(batch=2, length=6, seed=2)
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=20, do_sample=False,
                                attention_mask=torch.ones_like(prompt), pad_token_id=0)
    # Reference: recompute the whole sequence with Megatron at every step (no cache).
    seq = prompt
    for _ in range(20):
        next_token = _megatron_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(generated, seq)


def test_fresh_process_loads_without_megatron(exported, tmp_path):
    """Only transformers + torch in a fresh interpreter: no megatron, no megatron_dirmoe."""
    _, model, _, out, _ = exported
    tokens = _tokens(seed=3)
    torch.save(tokens, tmp_path / "tokens.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(
    {str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    logits = m(torch.load({str(tmp_path / 'tokens.pt')!r})).logits
torch.save(logits, {str(tmp_path / 'logits.pt')!r})
leaked = sorted(n for n in sys.modules if n.split('.')[0] in ('megatron', 'megatron_dirmoe'))
assert not leaked, leaked
print(type(m).__module__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "transformers_modules" in proc.stdout  # the folder's code, not the package's
    logits = torch.load(tmp_path / "logits.pt")
    assert (logits - _megatron_logits(model, tokens)).abs().max().item() <= LOGIT_ATOL


def test_hf_to_megatron_round_trip_is_exact(exported, tmp_path):
    from megatron_dirmoe.convert.hf_export import convert_to_megatron
    from megatron_dirmoe.convert.megatron_checkpoint import load_megatron_model

    _, model, _, out, _ = exported
    template = out.parent / "ckpt"
    ckpt = convert_to_megatron(out, template, tmp_path / "from_hf")
    assert ckpt.name == f"iter_{ITERATION:07d}"
    reloaded, _, iteration, _ = load_megatron_model(tmp_path / "from_hf")
    assert iteration == ITERATION
    original = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    again = {k: v for k, v in reloaded.state_dict().items() if not k.endswith("_extra_state")}
    assert original.keys() == again.keys()
    # The controllers' c and b come back folded into the spike bias (the same routing).
    counts = [k for k in original if k.endswith("count_bias")]
    assert bool(counts) == (exported[0] == "rms_gqa_freq_shared")  # calibrated recipe only
    for name in counts:
        load, bias = (name.replace("count_bias", other) for other in ("load_bias", "spike_bias"))
        assert original[name].abs().max() > 0 and original[load].abs().max() > 0  # k = 2: on
        assert torch.equal(again[name], torch.zeros(1))
        assert torch.equal(again[load], torch.zeros_like(original[load]))
        assert torch.equal(again[bias], original[bias] + (original.pop(name) + original.pop(load)))
        original.pop(bias)
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name


def test_refuses_mismatched_config_naming_the_tensor(exported):
    from megatron_dirmoe.convert import ConversionError
    from megatron_dirmoe.convert.hf_export import megatron_state_to_hf
    from megatron_dirmoe.hf import DirMoEHFConfig

    _, model, _, out, _ = exported
    config = DirMoEHFConfig.from_pretrained(str(out))
    config.moe_intermediate_size += 8
    first_moe = config.moe_layers[0]
    tensor = rf"'model\.layers\.{first_moe}\.mlp\.experts\.(gate_up|up)_proj'"
    with pytest.raises(ConversionError, match=tensor):
        megatron_state_to_hf(model.state_dict(), config)


def test_refuses_unsupported_architecture(exported):
    import copy

    from megatron_dirmoe.convert.megatron_checkpoint import cpu_args

    _, _, args, _, _ = exported
    bad = copy.copy(args)
    bad.rotary_percent = 0.5
    with pytest.raises(ValueError, match="--rotary-percent 0.5"):
        cpu_args(bad)


def _save_renamed(model, args, save_dir, rename):
    """Save like `save_megatron_checkpoint`, with sharded keys renamed by `rename(key)`."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_dirmoe.training.checkpointing import dist_save

    sharded = model.sharded_state_dict()
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor):
            sh.key = rename(sh.key)
    ckpt = save_dir / f"iter_{ITERATION:07d}"
    ckpt.mkdir(parents=True)
    dist_save({"args": args, "iteration": ITERATION, "checkpoint_version": 3.0, "model": sharded},
              ckpt)
    (save_dir / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return ckpt


def test_te_spec_moe_norm_names_are_accepted(exported, tmp_path):
    """TE MoE layers save their pre-MLP norm as `pre_mlp_layernorm.weight` (a separate TENorm),
    while the local spec maps it to the fused name `mlp.linear_fc1.layer_norm_weight`."""
    from megatron.core import dist_checkpointing

    from megatron_dirmoe.convert.hf_export import convert_to_hf, load_hf_state

    _, model, args, out, _ = exported
    moe_layers = json.loads((out / "config.json").read_text())["moe_layers"]

    def te_name(key):
        # Megatron numbers the layers in sharded keys when they differ (dense and MoE mixed) and
        # stacks them on a layer axis ("decoder.layers.<name>") when they are all alike.
        moe = key.startswith("decoder.layers.mlp.") or any(
            key.startswith(f"decoder.layers.{i}.") for i in moe_layers)
        if moe and ".mlp.linear_fc1.layer_norm_" in key:
            return key.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")
        return key

    ckpt = _save_renamed(model, args, tmp_path / "te_names", te_name)
    saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    assert any(key.endswith("pre_mlp_layernorm.weight") for key in saved)
    convert_to_hf(tmp_path / "te_names", tmp_path / "hf", copy_tokenizer=False)
    reference, again = load_hf_state(out), load_hf_state(tmp_path / "hf")
    assert reference.keys() == again.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)


def test_refuses_checkpoint_whose_shapes_differ_from_its_args(exported, tmp_path):
    import copy

    from megatron_dirmoe.convert.hf_export import convert_to_hf

    _, model, args, _, _ = exported
    wrong = copy.copy(args)
    wrong.moe_ffn_hidden_size = args.moe_ffn_hidden_size + 8
    _save_renamed(model, wrong, tmp_path / "wrong", lambda key: key)
    # Layer-numbered key when dense and MoE layers mix, layer-stacked key when all are MoE.
    message = (r"'decoder\.layers\.(\d\.)?mlp\.experts\.experts\.linear_fc2\.weight: "
               r"checkpoint \((3, )?8, 64, 32\), model \((3, )?8, 64, 40\)'\]")
    with pytest.raises(ValueError, match=message):
        convert_to_hf(tmp_path / "wrong", tmp_path / "hf", copy_tokenizer=False)


def test_checkpoint_from_pretrain_entry_point(megatron_single_rank, tmp_path):
    """Train a few steps with `python -m megatron_dirmoe.pretrain` (CPU loop, embedded corpus
    and SentencePiece tokenizer), convert its checkpoint, compare with the trained model."""
    from megatron_dirmoe.convert.hf_export import convert_to_hf
    from megatron_dirmoe.pretrain import main
    from megatron_dirmoe.router import set_router_iteration

    iters = 3
    result = main([
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--moe-layer-freq", "[0,1]",
        "--ffn-hidden-size", "96", "--moe-ffn-hidden-size", "64", "--num-experts", "4",
        "--seq-length", "32", "--max-position-embeddings", "64", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--lr", "3e-3", "--train-iters", str(iters),
        "--eval-iters", "0", "--log-interval", "100", "--dirmoe-device", "cpu",
        "--dirmoe-target-k", "1", "--save", str(tmp_path / "run"), "--save-interval", str(iters),
        "--dirmoe-data-cache", str(tmp_path / "data"),
    ])
    summary = convert_to_hf(tmp_path / "run", tmp_path / "hf", verify=True)
    assert summary["iteration"] == iters and summary["max_abs_logit_diff"] <= LOGIT_ATOL
    assert (tmp_path / "hf" / "tokenizer.model").is_file()

    model = result.model.eval()
    set_router_iteration(model, iters)
    hf = _load_hf(tmp_path / "hf")
    # k = 1: the single expert's weight is the sigmoid of its centred logit, in both models.
    assert (hf.config.router_renormalize, hf.config.router_unnormalized_weight) == (False,
                                                                                   "sigmoid")
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 20), generator=gen)
    with torch.no_grad():
        logits = hf(tokens).logits
    assert (logits - _megatron_logits(model, tokens)).abs().max().item() <= LOGIT_ATOL

    # A normal HF folder: AutoTokenizer gives the training tokenizer's ids, pipeline generates.
    import sentencepiece as spm
    from transformers import AutoTokenizer, pipeline

    from megatron_dirmoe.convert.hf_tokenizer import SAMPLE_TEXTS
    from megatron_dirmoe.data.corpus import iter_documents

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model"))
    docs = iter_documents("valid")
    texts = [*SAMPLE_TEXTS, *(next(docs)["text"][:3000] for _ in range(20))]
    for text in texts:
        assert tokenizer(text)["input_ids"] == sp.encode(text), text[:60]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    generator = pipeline("text-generation", model=str(tmp_path / "hf"), trust_remote_code=True)
    text = generator("ROMEO.\nBut soft,", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO.\nBut soft,") and len(text) > len("ROMEO.\nBut soft,")


def test_capacity_factor_is_not_exported_and_verified_dropless(exported, tmp_path):
    import copy

    from megatron_dirmoe.convert.hf_export import convert_to_hf

    _, model, args, _, _ = exported
    with_capacity = copy.copy(args)
    with_capacity.dirmoe_capacity_factor = 0.5  # drops pairs in Megatron, batch-dependent
    _save_renamed(model, with_capacity, tmp_path / "cap", lambda key: key)
    with pytest.warns(UserWarning, match="capacity-factor 0.5 is not exported"):
        summary = convert_to_hf(tmp_path / "cap", tmp_path / "hf", copy_tokenizer=False,
                                verify=True)
    assert summary["capacity_factor_not_exported"] == 0.5
    assert summary["max_abs_logit_diff"] <= LOGIT_ATOL


def test_bf16_checkpoint_converts(exported, tmp_path):
    """GPU runs save bf16 parameters (routers stay fp32): they load into the fp32 rebuild."""
    from megatron_dirmoe.convert.hf_export import convert_to_hf, load_hf_state
    from megatron_dirmoe.convert.megatron_checkpoint import build_cpu_model

    _, model, args, _, _ = exported
    bf16 = build_cpu_model(args)
    bf16.load_state_dict(model.state_dict())
    for name, param in bf16.named_parameters():
        if ".router." not in name:
            param.data = param.data.bfloat16()
    _save_renamed(bf16, args, tmp_path / "bf16", lambda key: key)
    summary = convert_to_hf(tmp_path / "bf16", tmp_path / "hf", copy_tokenizer=False, verify=True)
    assert summary["max_abs_logit_diff"] <= LOGIT_ATOL
    embedding = load_hf_state(tmp_path / "hf")["model.embed_tokens.weight"]
    assert embedding.dtype == torch.float32
    assert torch.equal(embedding, model.embedding.word_embeddings.weight.bfloat16().float())
