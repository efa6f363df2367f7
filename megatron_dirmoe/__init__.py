"""megatron_dirmoe: the DirMoE (Dirichlet-routed Mixture of Experts) router for Megatron-Core.

Public API:
    DirMoEConfig            all router hyperparameters, validated, with the paper's defaults
    DirichletRouter         a megatron.core Router subclass implementing DirMoE routing
    get_dirmoe_layer_spec   a GPT layer spec with DirMoE MoE layers (TE or local/CPU modules)
    get_dirmoe_decoder_block_spec   the same for a whole decoder block (moe_layer_freq, PP)
    swap_router             one-line router swap on any Megatron MoE layer/block spec
    set_router_iteration    tell every DirMoE router the training iteration (schedules)
"""

from megatron_dirmoe.config import DirMoEConfig, add_dirmoe_args, config_from_args
from megatron_dirmoe.router import DirichletRouter, iter_dirichlet_routers, set_router_iteration
from megatron_dirmoe.specs import (
    dirichlet_router_builder,
    get_dirmoe_decoder_block_spec,
    get_dirmoe_layer_spec,
    swap_router,
)

__version__ = "0.1.0"

__all__ = [
    "DirMoEConfig",
    "DirichletRouter",
    "add_dirmoe_args",
    "config_from_args",
    "dirichlet_router_builder",
    "get_dirmoe_decoder_block_spec",
    "get_dirmoe_layer_spec",
    "iter_dirichlet_routers",
    "set_router_iteration",
    "swap_router",
]
