"""`check_resume_layout`: the layout changes whose optimizer state Megatron-Core 0.19 cannot load
stop at start-up with the flags to use; every other change passes (the multi-rank resume itself
is tests/distributed/test_resume_layout.py)."""

from __future__ import annotations

from argparse import Namespace

import pytest

from megatron_dirmoe.training.checkpointing import check_resume_layout


def _args(tp=1, pp=1, ep=1, etp=None, dist_opt=False, reshardable=False, **extra):
    return Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     expert_model_parallel_size=ep,
                     expert_tensor_parallel_size=tp if etp is None else etp,
                     use_distributed_optimizer=dist_opt,
                     dist_ckpt_optim_fully_reshardable=reshardable, **extra)


@pytest.mark.parametrize("saved, resumed", [
    (_args(tp=2, ep=2), _args(ep=4)),  # TP2 x EP2 -> EP4
    (_args(pp=2), _args()),  # PP2 -> one rank
    (_args(ep=8), _args(tp=4, ep=2)),
    (_args(tp=2, dist_opt=True, reshardable=True), _args(dist_opt=True)),
    (_args(tp=2, dist_opt=True), _args(tp=2, dist_opt=True)),  # only DP changes
    (_args(tp=2, ep=2), _args(no_load_optim=True)),  # fresh optimizer state: anything goes
    (_args(tp=2, ep=2), _args(finetune=True)),
])
def test_resumable_layouts_pass(saved, resumed):
    check_resume_layout(saved, resumed, "ckpt")


@pytest.mark.parametrize("saved, resumed, message", [
    (_args(tp=2, ep=2), _args(), "expert parallelism is switched off"),
    (_args(), _args(ep=2), "expert parallelism is switched on"),
    (_args(tp=2, etp=1), _args(tp=2), "expert parallelism is switched off"),  # ETP != TP
    (_args(tp=2, dist_opt=True), _args(dist_opt=True), "--dist-ckpt-optim-fully-reshardable"),
    (_args(pp=2, dist_opt=True), _args(dist_opt=True), "--dist-ckpt-optim-fully-reshardable"),
])
def test_unloadable_layouts_stop_naming_the_flags(saved, resumed, message):
    with pytest.raises(ValueError, match=message) as err:
        check_resume_layout(saved, resumed, "ckpt")
    assert "--no-load-optim" in str(err.value) and str(err.value).startswith("ckpt: ")


def test_no_checkpoint_passes():
    check_resume_layout(None, _args(ep=2), "ckpt")
