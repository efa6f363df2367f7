"""Megatron distributed checkpoint -> Hugging Face folder (and back), with logit verification.

Steps of :func:`convert_to_hf`:
1. load the checkpoint into a one-rank CPU Megatron model (any saved TP/PP/EP layout);
2. derive the HF config (architecture + router eval constants at the checkpoint's iteration);
3. map tensor names and layouts through the one table (`mapping.TABLE`), checking every name
   and every shape against the HF model;
4. write the folder with `transformers`' own `save_pretrained` (safetensors shards and index,
   config.json, generation_config.json; the tokenizer as an `AutoTokenizer` folder) plus the
   model code;
5. optionally (`verify`) load the folder with `transformers` and compare logits.
"""

from __future__ import annotations

import shutil
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_dirmoe.convert.mapping import (
    ConversionError,
    hf_to_megatron,
    layout_from_hf_config,
    megatron_to_hf,
)

__all__ = [
    "hf_config_from_megatron",
    "megatron_state_to_hf",
    "write_hf_folder",
    "load_hf_tokenizer",
    "convert_to_hf",
    "verify_logits",
    "load_hf_state",
    "hf_state_to_megatron_model",
    "convert_to_megatron",
]

# ---------------------------------------------------------------------- config
def _activation_name(fn) -> str:
    import torch.nn.functional as F

    if fn is F.silu:
        return "silu"
    if fn is F.gelu:
        return "gelu"
    name = getattr(fn, "__name__", fn)
    raise ConversionError(f"activation {name!r}: only silu and gelu are supported")


def hf_config_from_megatron(model, config, dirmoe_config, iteration: int, **extra):
    """`DirMoEHFConfig` for a built Megatron GPT (`config`: its TransformerConfig)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_dirmoe.hf import AUTO_MAP, DirMoEHFConfig
    from megatron_dirmoe.schedules import temperature_at

    layers = model.decoder.layers
    moe_layers = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoELayer)]
    E = config.num_moe_experts
    # Router heads stacked in one weight (spike, slab, ...): its rows in units of E.
    router_rows = {layers[i].mlp.router.weight.shape[0] for i in moe_layers}
    if len(router_rows) != 1 or next(iter(router_rows)) % E:
        raise ConversionError(f"router weights with {sorted(router_rows)} rows: expected one "
                              f"multiple of num_experts={E} for every MoE layer")
    return DirMoEHFConfig(
        vocab_size=model.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        moe_intermediate_size=config.moe_ffn_hidden_size,
        shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
        shared_expert_gate=bool(config.moe_shared_expert_gate),
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        hidden_act=_activation_name(config.activation_func),
        gated_linear_unit=config.gated_linear_unit,
        normalization=config.normalization,
        norm_eps=config.layernorm_epsilon,
        qk_layernorm=config.qk_layernorm,
        max_position_embeddings=model.max_sequence_length,
        rope_theta=float(model.rotary_base),
        num_experts=E,
        moe_layers=moe_layers,
        router_target_k=dirmoe_config.target_k,
        router_tau=temperature_at(dirmoe_config, iteration),
        router_iteration=iteration,
        router_posterior_scale=dirmoe_config.posterior_scale,
        router_alpha_floor=dirmoe_config.alpha_floor,
        router_alpha_ceiling=dirmoe_config.alpha_ceiling,
        router_leak=dirmoe_config.leak,
        router_threshold=dirmoe_config.route_threshold,
        router_max_active=dirmoe_config.max_active_for(E),
        router_renormalize=dirmoe_config.renormalize,
        router_rule=dirmoe_config.routing_rule,
        router_fallback_k=dirmoe_config.fallback_k,
        router_logit_heads=next(iter(router_rows)) // E,
        router_slab=dirmoe_config.slab,
        router_unnormalized_weight=dirmoe_config.effective_unnormalized_weight,
        tie_word_embeddings=model.share_embeddings_and_output_weights,
        architectures=["DirMoEForCausalLM"],
        auto_map=dict(AUTO_MAP),
        dtype="float32",
        **extra,
    )


# ---------------------------------------------------------------------- tensors
def _hf_expected_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the HF model for `hf_config`, built on the meta device."""
    from megatron_dirmoe.hf import DirMoEForCausalLM

    with torch.device("meta"):
        model = DirMoEForCausalLM(hf_config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


# The controllers' biases: the count controller's c [1] and the load controller's b [E]
# (`DirichletRouter.count_bias`, `.load_bias`). At inference the spike bias acts only on the
# routing decision (l + (bias + (c + b)) >= 0; the weights are the softmax of the centred logits),
# so the export folds c + b into it, summed in the router's order, and the HF model needs no
# tensor of its own.
_CONTROL_BIASES = ("mlp.router.count_bias", "mlp.router.load_bias")
_SPIKE_BIAS = "mlp.router.spike_bias"


def _fold_control_biases(state: dict) -> dict:
    """`state` with every router's c + b added to its spike bias and dropped."""
    state = dict(state)
    prefixes = {key[: -len(suffix)] for key in state for suffix in _CONTROL_BIASES
                if key.endswith(suffix)}
    for prefix in prefixes:
        biases = [state.pop(prefix + suffix).float() for suffix in _CONTROL_BIASES
                  if prefix + suffix in state]
        route_bias = sum(biases[1:], biases[0])  # c + b, as the router adds them
        bias_key = prefix + _SPIKE_BIAS
        state[bias_key] = (state[bias_key].float() + route_bias).to(state[bias_key].dtype)
    return state


def megatron_state_to_hf(megatron_state: dict, hf_config) -> dict[str, torch.Tensor]:
    """Map a one-rank Megatron state dict to HF tensors, validated against the HF model."""
    state = _fold_control_biases({k: v for k, v in megatron_state.items()
                                  if not k.endswith("._extra_state")})
    expected = _hf_expected_shapes(hf_config)
    hf_state = megatron_to_hf(state, layout_from_hf_config(hf_config), expected)
    missing = sorted(set(expected) - set(hf_state))
    if missing:
        raise ConversionError(f"the HF model has tensors no rule produces: {missing[:8]}")
    return hf_state


def _hf_model(hf_state: dict[str, torch.Tensor], hf_config):
    """The HF model holding `hf_state`'s tensors: built on the meta device, the tensors assigned
    (copied only when one is a view into a larger or shared storage, e.g. a split fused QKV), the
    LM head tied to the embedding when the config says so."""
    from megatron_dirmoe.hf import DirMoEForCausalLM

    with torch.device("meta"):
        model = DirMoEForCausalLM(hf_config)
    state, storages = {}, set()
    for name, tensor in hf_state.items():
        storage = tensor.untyped_storage()
        if (not tensor.is_contiguous() or storage.data_ptr() in storages
                or storage.nbytes() != tensor.numel() * tensor.element_size()):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(tensor.untyped_storage().data_ptr())
        state[name] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ConversionError(f"HF state does not fit the model: missing {sorted(missing)[:8]}, "
                              f"unexpected {sorted(unexpected)[:8]}")
    model.tie_weights()
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ConversionError(f"parameters left without a value: {on_meta[:8]}")
    return model.eval()


def load_hf_state(hf_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder's safetensors shards."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} has no *.safetensors files")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _copy_model_code(out_dir: Path) -> None:
    from megatron_dirmoe.hf import EXPORTED_CODE_FILES

    for source, name in EXPORTED_CODE_FILES.items():
        shutil.copyfile(source, out_dir / name)


def _tokenizer_source(args: Namespace, tokenizer: Optional[str]) -> Optional[Path]:
    """The run's tokenizer file or directory (`tokenizer` overrides the checkpoint's
    --tokenizer-model); None when the run used none (e.g. NullTokenizer)."""
    source = tokenizer or getattr(args, "tokenizer_model", None)
    if not source:
        return None
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer {source!r} (from {'--tokenizer' if tokenizer else 'the checkpoint args'}) "
            "not found; pass --tokenizer PATH or --no-tokenizer"
        )
    return path


def load_hf_tokenizer(source: Union[str, Path], model_max_length: Optional[int] = None):
    """The `transformers` tokenizer for a run's tokenizer: a Hugging Face tokenizer directory as
    `AutoTokenizer` loads it, a SentencePiece `.model` converted to a fast tokenizer with the same
    ids (warns when they differ on sample texts)."""
    from transformers import AutoTokenizer

    from megatron_dirmoe.convert.hf_tokenizer import check_ids_match, sentencepiece_to_hf

    path = Path(source)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    hf_tokenizer = sentencepiece_to_hf(path, model_max_length=model_max_length)
    differ = check_ids_match(path, hf_tokenizer)
    if differ:
        warnings.warn(f"the Hugging Face tokenizer built from {path} gives other ids than "
                      f"SentencePiece on {len(differ)} sample texts, e.g. {differ[0]!r}",
                      stacklevel=2)
    return hf_tokenizer


def _special_token_ids(hf_tokenizer) -> dict:
    """bos/eos/pad ids for config.json and generation_config.json (None when absent)."""
    return {f"{name}_token_id": getattr(hf_tokenizer, f"{name}_token_id", None)
            for name in ("bos", "eos", "pad")}


def write_hf_folder(hf_state, hf_config, out_dir: Union[str, Path], *, max_shard_size="5GB",
                    dtype: Optional[torch.dtype] = None, tokenizer=None,
                    tokenizer_source: Optional[Union[str, Path]] = None) -> Path:
    """`save_pretrained` of the HF model holding `hf_state` (safetensors shards of at most
    `max_shard_size`, with transformers' index when sharded; config.json; generation_config.json),
    of `tokenizer` when given, and the model code for `trust_remote_code` loading. A tokenizer
    file `tokenizer_source` is also copied (a SentencePiece model as `tokenizer.model`, which
    Megatron's --tokenizer-model takes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
        hf_config.dtype = str(dtype).removeprefix("torch.")
    model = _hf_model(hf_state, hf_config)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    if tokenizer_source is not None and Path(tokenizer_source).is_file():
        source = Path(tokenizer_source)
        shutil.copyfile(source, out_dir / ("tokenizer.model" if source.suffix == ".model"
                                           else source.name))
    _copy_model_code(out_dir)
    return out_dir


# ---------------------------------------------------------------------- end to end
def convert_to_hf(
    checkpoint: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    iteration: Optional[int] = None,
    tokenizer: Optional[str] = None,
    copy_tokenizer: bool = True,
    max_shard_size: Union[int, str] = "5GB",
    dtype: Optional[torch.dtype] = None,
    verify: bool = False,
    verify_sequences: int = 4,
    verify_length: int = 32,
    atol: float = 1e-4,
) -> dict:
    """Convert a Megatron DirMoE checkpoint to a Hugging Face folder; returns a summary dict
    (with the measured max logit difference when `verify`)."""
    from megatron_dirmoe.convert.megatron_checkpoint import (
        dirmoe_config_from_args,
        load_megatron_model,
    )

    model, args, ckpt_iteration, ckpt_dir = load_megatron_model(checkpoint, iteration)
    tokenizer_source = _tokenizer_source(args, tokenizer) if copy_tokenizer else None
    hf_tokenizer = None
    if tokenizer_source is not None and (tokenizer_source.is_dir()
                                         or tokenizer_source.suffix == ".model"):
        hf_tokenizer = load_hf_tokenizer(tokenizer_source, model.max_sequence_length)
    elif tokenizer_source is not None:
        warnings.warn(f"tokenizer {tokenizer_source} is neither a SentencePiece .model nor a "
                      "Hugging Face tokenizer directory: copied as is, AutoTokenizer will not "
                      "load it", stacklevel=2)
    hf_config = hf_config_from_megatron(
        # calibrated_for: the values the routers were built with (calibrators resolved).
        model, model.config,
        dirmoe_config_from_args(args).calibrated_for(model.config.num_moe_experts),
        ckpt_iteration,
        **(_special_token_ids(hf_tokenizer) if hf_tokenizer is not None else {}),
    )
    hf_state = megatron_state_to_hf(model.state_dict(), hf_config)
    out_dir = write_hf_folder(
        hf_state, hf_config, out_dir, max_shard_size=max_shard_size, dtype=dtype,
        tokenizer=hf_tokenizer, tokenizer_source=tokenizer_source,
    )
    summary = {
        "checkpoint": str(ckpt_dir),
        "iteration": ckpt_iteration,
        "output": str(out_dir),
        "tensors": len(hf_state),
        "parameters": sum(t.numel() for t in hf_state.values()),
        "router_tau": hf_config.router_tau,
        "tokenizer": None if tokenizer_source is None else str(tokenizer_source),
    }
    dirmoe_config = dirmoe_config_from_args(args)
    if dirmoe_config.capacity_factor is not None:
        # Capacity drops depend on how many tokens share a batch; the HF model is dropless
        # (what inference wants), so it is verified against the Megatron model without drops.
        warnings.warn(
            f"--dirmoe-capacity-factor {dirmoe_config.capacity_factor} is not exported: the HF "
            "model routes dropless", stacklevel=2,
        )
        summary["capacity_factor_not_exported"] = dirmoe_config.capacity_factor
        for module in model.modules():
            if hasattr(module, "capacity_factor"):
                module.capacity_factor = None
    if verify:
        diff = verify_logits(model, out_dir, num_sequences=verify_sequences, length=verify_length)
        summary["max_abs_logit_diff"] = diff
        if diff > atol and dtype in (None, torch.float32):
            raise ConversionError(
                f"verification failed: max |logits_hf - logits_megatron| = {diff:.3e} > {atol:.1e}"
            )
    return summary


@torch.no_grad()
def megatron_logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] (fp32, on the tokens' device) of a one-rank Megatron GPT in eval mode,
    run on the device of its parameters (causal mask, no labels)."""
    from megatron.core.transformer.moe import moe_logging

    device = next(model.parameters()).device
    B, S = tokens_BS.shape
    position_ids = torch.arange(S, device=device)[None].expand(B, -1)
    # Routers record metrics in Megatron's process-global tracker, whose per-layer buffers are
    # sized by the first model that records; use a private one so models of any depth can be
    # evaluated in one process without touching a training run's metrics.
    saved = moe_logging.get_moe_metrics_tracker()
    moe_logging.set_moe_metrics_tracker(moe_logging.MoEMetricsTracker())
    try:
        logits = model(tokens_BS.to(device), position_ids, None)
    finally:
        moe_logging.set_moe_metrics_tracker(saved)
    return logits.float().to(tokens_BS.device)


@torch.no_grad()
def verify_logits(model, hf_dir: Union[str, Path], *, num_sequences: int = 4, length: int = 32,
                  seed: int = 0) -> float:
    """Max |logits| difference between the HF folder (loaded with `transformers`) and the
    Megatron model in eval mode on random token sequences. Both run on CUDA when available
    (Megatron's rotary embedding moves itself there), else on CPU."""
    from transformers import AutoModelForCausalLM

    import megatron_dirmoe.hf  # noqa: F401  (registers the Auto classes)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf_model.to(device).eval()
    model.to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, hf_model.config.vocab_size, (num_sequences, length), generator=gen)
    reference = megatron_logits(model, tokens.to(device))
    logits = hf_model(tokens.to(device)).logits.float()
    return (logits - reference).abs().max().item()


# ---------------------------------------------------------------------- reverse direction
def hf_state_to_megatron_model(model, hf_dir: Union[str, Path]) -> None:
    """Load an HF folder's weights into a one-rank Megatron model built for the same
    architecture (the inverse mapping of the same table); strict on names and shapes."""
    from megatron_dirmoe.hf import DirMoEHFConfig

    hf_config = DirMoEHFConfig.from_pretrained(str(hf_dir))
    hf_state = load_hf_state(hf_dir)
    if hf_config.tie_word_embeddings:
        hf_state.pop("lm_head.weight", None)
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    expected = {k: tuple(v.shape) for k, v in target.items()}
    state = hf_to_megatron(hf_state, layout_from_hf_config(hf_config), expected)
    for key in target:  # c + b stay folded into the spike bias: the controllers restart at 0
        if key.endswith(_CONTROL_BIASES) and key not in state:
            state[key] = torch.zeros_like(target[key])
    extra = sorted(set(target) - set(state))
    if extra:
        raise ConversionError(f"the Megatron model has tensors the HF folder lacks: {extra[:8]}")
    model.load_state_dict(state, strict=False)


def convert_to_megatron(
    hf_dir: Union[str, Path],
    template_checkpoint: Union[str, Path],
    save_dir: Union[str, Path],
    *,
    iteration: Optional[int] = None,
) -> Path:
    """HF folder -> Megatron checkpoint (model only) for continuing training. The architecture
    and training arguments come from `template_checkpoint` (the run the HF folder was exported
    from, or any run with the same architecture); the result is saved at the HF config's
    `router_iteration` unless `iteration` is given."""
    from megatron_dirmoe.convert.megatron_checkpoint import (
        build_cpu_model,
        ensure_single_rank_world,
        read_common_state,
        resolve_checkpoint_dir,
        save_megatron_checkpoint,
    )
    from megatron_dirmoe.hf import DirMoEHFConfig

    ckpt_dir = resolve_checkpoint_dir(template_checkpoint)
    args, _ = read_common_state(ckpt_dir)
    ensure_single_rank_world()
    model = build_cpu_model(args, ckpt_dir)
    hf_state_to_megatron_model(model, hf_dir)
    if iteration is None:
        iteration = int(DirMoEHFConfig.from_pretrained(str(hf_dir)).router_iteration)
    return save_megatron_checkpoint(model, args, iteration, save_dir)


