"""Megatron distributed checkpoint -> Hugging Face folder (and back), with logit verification.

Steps of :func:`convert_to_hf`:
1. load the checkpoint into a one-rank CPU Megatron model (any saved TP/PP/EP layout);
2. derive the HF config (architecture + router eval constants at the checkpoint's iteration);
3. map tensor names and layouts through the one table (`mapping.TABLE`), checking every name
   and every shape against the HF model;
4. write safetensors shards + index, config.json, tokenizer files, and the model code;
5. optionally (`verify`) load the folder with `transformers` and compare logits.
"""

from __future__ import annotations

import json
import os
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
    "convert_to_hf",
    "verify_logits",
    "load_hf_state",
    "hf_state_to_megatron_model",
    "convert_to_megatron",
]

SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"


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
        tie_word_embeddings=model.share_embeddings_and_output_weights,
        architectures=["DirMoEForCausalLM"],
        auto_map=dict(AUTO_MAP),
        torch_dtype="float32",
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


def megatron_state_to_hf(megatron_state: dict, hf_config) -> dict[str, torch.Tensor]:
    """Map a one-rank Megatron state dict to HF tensors, validated against the HF model."""
    state = {k: v for k, v in megatron_state.items() if not k.endswith("._extra_state")}
    expected = _hf_expected_shapes(hf_config)
    hf_state = megatron_to_hf(state, layout_from_hf_config(hf_config), expected)
    missing = sorted(set(expected) - set(hf_state))
    if missing:
        raise ConversionError(f"the HF model has tensors no rule produces: {missing[:8]}")
    return hf_state


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def write_safetensors(
    state: dict[str, torch.Tensor], out_dir: Path, max_shard_size: Union[int, str] = "5GB"
) -> list[str]:
    """Greedy shards of at most `max_shard_size` bytes (a tensor never splits) plus the HF index
    (always written, even for one shard). Returns the shard file names."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        os.chmod(out_dir / file_name, 0o644)  # safetensors creates 0600; shards get shared
        weight_map.update({tensor_name: file_name for tensor_name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFE_WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


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


def _copy_tokenizer(args: Namespace, out_dir: Path, tokenizer: Optional[str]) -> Optional[str]:
    """Copy the run's tokenizer: a Hugging Face tokenizer directory is re-saved with
    `AutoTokenizer`; a SentencePiece `.model` file is copied verbatim as `tokenizer.model`.
    Returns what was copied (None when the run used no tokenizer file, e.g. NullTokenizer)."""
    source = tokenizer or getattr(args, "tokenizer_model", None)
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(out_dir))
        return str(path)
    if path.is_file():
        name = "tokenizer.model" if path.suffix == ".model" else path.name
        shutil.copyfile(path, out_dir / name)
        return str(path)
    raise FileNotFoundError(
        f"tokenizer {source!r} (from {'--tokenizer' if tokenizer else 'the checkpoint args'}) not "
        "found; pass --tokenizer PATH or --no-tokenizer"
    )


def write_hf_folder(hf_state, hf_config, out_dir: Union[str, Path], *, max_shard_size="5GB",
                    dtype: Optional[torch.dtype] = None) -> Path:
    """safetensors shards + config.json + model code in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
        hf_config.torch_dtype = str(dtype).removeprefix("torch.")
    write_safetensors(hf_state, out_dir, max_shard_size)
    hf_config.save_pretrained(str(out_dir))
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
    hf_config = hf_config_from_megatron(
        model, model.config, dirmoe_config_from_args(args), ckpt_iteration
    )
    hf_state = megatron_state_to_hf(model.state_dict(), hf_config)
    out_dir = write_hf_folder(
        hf_state, hf_config, out_dir, max_shard_size=max_shard_size, dtype=dtype
    )
    tokenizer_source = _copy_tokenizer(args, out_dir, tokenizer) if copy_tokenizer else None
    summary = {
        "checkpoint": str(ckpt_dir),
        "iteration": ckpt_iteration,
        "output": str(out_dir),
        "tensors": len(hf_state),
        "parameters": sum(t.numel() for t in hf_state.values()),
        "router_tau": hf_config.router_tau,
        "tokenizer": tokenizer_source,
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
        build_model_from_args,
        ensure_single_rank_world,
        read_common_state,
        resolve_checkpoint_dir,
        save_megatron_checkpoint,
    )
    from megatron_dirmoe.hf import DirMoEHFConfig

    ckpt_dir = resolve_checkpoint_dir(template_checkpoint)
    args, _ = read_common_state(ckpt_dir)
    ensure_single_rank_world()
    model = build_model_from_args(args, ckpt_dir)
    hf_state_to_megatron_model(model, hf_dir)
    if iteration is None:
        iteration = int(DirMoEHFConfig.from_pretrained(str(hf_dir)).router_iteration)
    return save_megatron_checkpoint(model, args, iteration, save_dir)


