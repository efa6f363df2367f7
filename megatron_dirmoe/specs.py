"""Layer and block specs: the one-line router swap and ready DirMoE GPT specs.

`swap_router(spec, router)` rewrites any Megatron MoE layer / block spec so that its MoE layers
build `router` instead of `TopKRouter`. `get_dirmoe_layer_spec` and
`get_dirmoe_decoder_block_spec` return GPT specs with DirMoE MoE layers, using Transformer
Engine modules when TE is importable and local modules otherwise (with `SDPAttention` and
`TorchNorm`, so the local spec runs on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_decoder_layer_specs,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dirmoe.config import DirMoEConfig
from megatron_dirmoe.layers import SDPAttention, TorchNorm
from megatron_dirmoe.router import DirichletRouter

__all__ = [
    "swap_router",
    "dirichlet_router_builder",
    "get_dirmoe_layer_spec",
    "get_dirmoe_decoder_block_spec",
    "get_dirmoe_mtp_block_spec",
    "with_dirmoe_routers",
    "te_available",
]


def te_available() -> bool:
    """Whether Transformer Engine imported (Megatron's own check)."""
    return bool(HAVE_TE)


def _map_spec(node: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuild a spec tree bottom-up, applying `fn` to every node (returns a new tree).

    Specs mix `ModuleSpec`, submodule dataclasses, `functools.partial` builders (Megatron's MoE
    layer is `partial(MoELayer, submodules=MoESubmodules(...))`), lists and plain classes.
    """
    if isinstance(node, ModuleSpec):
        node = dataclasses.replace(
            node,
            submodules=_map_spec(node.submodules, fn),
            params={k: _map_spec(v, fn) for k, v in node.params.items()},
        )
    elif isinstance(node, functools.partial):
        node = functools.partial(
            _map_spec(node.func, fn),
            *[_map_spec(a, fn) for a in node.args],
            **{k: _map_spec(v, fn) for k, v in node.keywords.items()},
        )
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _map_spec(getattr(node, f.name), fn) for f in dataclasses.fields(node)
                   if f.init}
        node = dataclasses.replace(node, **changes)
    elif isinstance(node, list):
        node = [_map_spec(item, fn) for item in node]
    elif isinstance(node, tuple):
        node = tuple(_map_spec(item, fn) for item in node)
    return fn(node)


def swap_router(spec: Any, router: Callable[..., Any], *, require_moe: bool = True) -> Any:
    """Return a copy of a Megatron layer or block spec whose MoE layers build `router`.

    Works on `ModuleSpec(TransformerLayer, ...)` from `get_gpt_layer_local_spec` /
    `get_gpt_layer_with_transformer_engine_spec`, on `TransformerBlockSubmodules` from
    `get_gpt_decoder_block_spec`, and on anything else built from `MoESubmodules`. `router` is
    called as ``router(config=..., pg_collection=..., is_mtp_layer=...)``, e.g.
    ``dirichlet_router_builder(DirMoEConfig(...))`` or Megatron's `TopKRouter`.

    Raises `ValueError` if the spec contains no MoE layer (nothing to swap), unless
    `require_moe=False` (e.g. a pipeline stage that holds only dense layers).
    """
    found = []

    def replace(node: Any) -> Any:
        if isinstance(node, MoESubmodules):
            found.append(node)
            return dataclasses.replace(node, router=router)
        return node

    new_spec = _map_spec(spec, replace)
    if not found and require_moe:
        raise ValueError(
            "swap_router: the spec has no MoE layer (no MoESubmodules); build it with num_experts "
            "set, e.g. get_gpt_layer_local_spec(num_experts=8)"
        )
    return new_spec


def dirichlet_router_builder(dirmoe_config: DirMoEConfig) -> Callable[..., DirichletRouter]:
    """`DirichletRouter` with `dirmoe_config` bound, in the form `MoESubmodules.router` expects."""
    return functools.partial(DirichletRouter, dirmoe_config=dirmoe_config)


def _use_te(use_te: Optional[bool]) -> bool:
    if use_te and not HAVE_TE:
        raise ValueError("use_te=True but Transformer Engine is not importable; install the [te] extra")
    return HAVE_TE if use_te is None else use_te


def _cpu_capable(spec: Any) -> Any:
    """Swap the local spec's CUDA-only attention and SP-refusing norm for CPU-capable ones."""
    swaps = {DotProductAttention: SDPAttention, WrappedTorchNorm: TorchNorm}
    return _map_spec(spec, lambda node: swaps.get(node, node) if isinstance(node, type) else node)


def _dirmoe_moe_layer(spec: Any) -> Any:
    """Use the variable-k MoE layer (and its dispatcher) in place of Megatron's `MoELayer`."""
    from megatron_dirmoe.moe_layer import DirMoELayer

    return _map_spec(spec, lambda node: DirMoELayer if node is MoELayer else node)


def get_dirmoe_layer_spec(
    dirmoe_config: Optional[DirMoEConfig] = None,
    *,
    num_experts: int = 8,
    use_te: Optional[bool] = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    normalization: str = "LayerNorm",
) -> ModuleSpec:
    """GPT transformer-layer spec whose MLP is a DirMoE MoE layer.

    `use_te=None` picks Transformer Engine modules when TE is importable, local modules
    otherwise (CPU-capable). Pass the result as `transformer_layer_spec` to `GPTModel`.
    """
    dirmoe_config = dirmoe_config or DirMoEConfig()
    if _use_te(use_te):
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm
        )
    else:
        spec = _cpu_capable(
            get_gpt_layer_local_spec(
                num_experts=num_experts,
                moe_grouped_gemm=moe_grouped_gemm,
                qk_layernorm=qk_layernorm,
                normalization=normalization,
            )
        )
    return _dirmoe_moe_layer(swap_router(spec, dirichlet_router_builder(dirmoe_config)))


def with_dirmoe_routers(spec: Any, dirmoe_config: Optional[DirMoEConfig] = None, *,
                        use_te: bool, router: Optional[Callable[..., Any]] = None) -> Any:
    """Any Megatron layer/block spec with DirMoE routers and the variable-k MoE layer in its MoE
    layers (or `router`, e.g. `TopKRouter`, for baselines), made CPU-capable when it is a local
    (non-TE) spec. Used for the ready specs, MTP layers and a user's ``--spec``."""
    if not use_te:
        spec = _cpu_capable(spec)
    if router is None:
        router = dirichlet_router_builder(dirmoe_config or DirMoEConfig())
        spec = _dirmoe_moe_layer(spec)
    # A pipeline stage may hold only dense layers (e.g. --moe-layer-freq [0,1] with PP=2).
    return swap_router(spec, router, require_moe=False)


def get_dirmoe_decoder_block_spec(
    config: TransformerConfig,
    dirmoe_config: Optional[DirMoEConfig] = None,
    *,
    use_te: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    router: Optional[Callable[..., Any]] = None,
    qk_l2_norm: bool = False,
):
    """Decoder block spec (dense and MoE layers per `config.moe_layer_freq`, final norm) with
    DirMoE routers. Pass `router` (e.g. Megatron's `TopKRouter`) to build the same model with
    another router on the same pipeline, for baselines. `qk_l2_norm` is Megatron's
    ``--qk-l2-norm`` (a spec argument as well as a config field)."""
    te = _use_te(use_te)
    spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=te,
        normalization=config.normalization,
        qk_l2_norm=qk_l2_norm,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    return with_dirmoe_routers(spec, dirmoe_config, use_te=te, router=router)


def get_dirmoe_mtp_block_spec(
    config: TransformerConfig,
    dirmoe_config: Optional[DirMoEConfig] = None,
    *,
    use_te: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    router: Optional[Callable[..., Any]] = None,
    qk_l2_norm: bool = False,
    layer_spec: Any = None,
):
    """Multi-token prediction block spec (``--mtp-num-layers``, DeepSeek-V3) whose transformer
    layer is the decoder's last layer -- a DirMoE MoE layer when that layer is MoE -- as
    Megatron-LM's ``gpt_builder`` does; None on stages without MTP layers.

    `layer_spec` is the decoder spec to take the last layer from (default: the full decoder's
    layer specs from `config`, so a pipeline stage without decoder layers still gets one)."""
    te = _use_te(use_te)
    if layer_spec is None or not getattr(layer_spec, "layer_specs", True):
        layer_spec = get_gpt_decoder_layer_specs(
            config, use_transformer_engine=te, normalization=config.normalization,
            qk_l2_norm=qk_l2_norm)[-1]
    elif hasattr(layer_spec, "layer_specs"):
        layer_spec = layer_spec.layer_specs[-1]
    spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=te,
                                  vp_stage=vp_stage)
    if spec is None:
        return None
    return with_dirmoe_routers(spec, dirmoe_config, use_te=te, router=router)
