"""megatron_dirmoe: the DirMoE (Dirichlet-routed Mixture of Experts) router for Megatron-Core.

Public API:
    DirMoEConfig            all router hyperparameters, validated, with their defaults
    DirichletRouter         a megatron.core Router subclass implementing DirMoE routing
    get_dirmoe_layer_spec   a GPT layer spec with DirMoE MoE layers (TE or local/CPU modules)
    get_dirmoe_decoder_block_spec   the same for a whole decoder block (moe_layer_freq, PP)
    swap_router             one-line router swap on any Megatron MoE layer/block spec
    set_router_iteration    tell every DirMoE router the training iteration (schedules)
    update_count_control    step every router's count and load controllers (after each optimizer step)

Megatron-dependent names are imported lazily, so `megatron_dirmoe.config` and
`megatron_dirmoe.routing` (pure Python / torch) stay importable without Megatron.
"""

from importlib import import_module

from megatron_dirmoe.config import DirMoEConfig, add_dirmoe_args, dirmoe_config_from_args

__version__ = "0.1.0"

_LAZY = {
    "DirichletRouter": "megatron_dirmoe.router",
    "iter_dirichlet_routers": "megatron_dirmoe.router",
    "set_router_iteration": "megatron_dirmoe.router",
    "update_count_control": "megatron_dirmoe.router",
    "dirichlet_router_builder": "megatron_dirmoe.specs",
    "get_dirmoe_decoder_block_spec": "megatron_dirmoe.specs",
    "get_dirmoe_layer_spec": "megatron_dirmoe.specs",
    "swap_router": "megatron_dirmoe.specs",
    "build_gpt_model": "megatron_dirmoe.model",
}

__all__ = ["DirMoEConfig", "add_dirmoe_args", "dirmoe_config_from_args", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_dirmoe' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
