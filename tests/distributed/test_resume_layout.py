"""A run saved at one parallel layout resumes at another (CPU, gloo), through the GPU path's own
pieces: `megatron.training`'s ``setup_model_and_optimizer`` (which loads ``--load``),
``train_step`` and ``save_checkpoint`` (torch_dist), with `megatron_dirmoe.training.gpu`'s model
provider, forward step and the data iterators `pretrain` builds on the embedded corpus.

A run saved at TP2 x EP2 after 2 of 4 iterations resumes at EP4 (DP 4), and one saved at PP2 (DP
2) on one rank; the next 2 training losses equal those of the saved run going on uninterrupted,
to 1e-5. That needs the model, the optimizer state (Adam moments), the learning-rate and DirMoE
schedules (the iteration) and the data position (consumed samples) to come back, resharded to
the new layout. The one change Megatron-Core cannot load the optimizer state across, expert
parallelism switched off (TP2 x EP2 -> one rank), stops at start-up with the flags to use
(`megatron_dirmoe.training.checkpointing.check_resume_layout`).

Every layout routes each micro-batch as one rank would: the DP replicas' micro-batches are the
single-rank micro-batches (global batch 4 = 4 micro-batches of 1 on one rank, 2 x 2 at DP 2,
1 x 4 at DP 4), the balance statistic is per micro-batch (TP x CP), and the routing noise is
aligned per (iteration, micro-batch, layer) by `harness._NoiseAligner` (test-only).
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
import torch.distributed as dist

from harness import _NoiseAligner, spawn

LOSS_RTOL = 1e-5
SAVED_AT, ITERS = 2, 4

COMMON = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
    "--moe-ffn-hidden-size 64 --num-experts 4 --seq-length 32 --max-position-embeddings 32 "
    f"--micro-batch-size 1 --global-batch-size 4 --train-iters {ITERS} --lr 3e-3 --min-lr 3e-4 "
    f"--lr-warmup-iters 1 --save-interval {SAVED_AT} --eval-iters 0 --eval-interval 1000 "
    "--transformer-impl local --use-cpu-initialization --init-method-std 0.2 "
    "--moe-token-dispatcher-type alltoall --dirmoe-device cuda --dirmoe-no-torch-compile "
    "--dirmoe-target-k 1 --num-workers 0 --seed 1234"
).split()

LAYOUTS = {
    "tp2_ep2": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                "--expert-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "ep4": ["--expert-model-parallel-size", "4"],
    "one_rank": [],
}


class _StepAligner(_NoiseAligner):
    """Noise per (iteration, micro-batch in single-rank order, layer). Megatron's sampler gives
    DP rank r the r-th micro-batch of each group of DP consecutive ones, so the c-th micro-batch
    of rank r is micro-batch c x DP + r of the step."""

    step = 0

    def index(self, dp_rank: int, call: int) -> int:
        from megatron.core import parallel_state as ps

        return self.step * 100 + call * ps.get_data_parallel_world_size() + dp_rank


def _parse(argv):
    from megatron.training.arguments import validate_args

    from megatron_dirmoe.training import world
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    # These CPU ranks stand in for the GPU ranks of a torchrun job (--dirmoe-device cuda): the
    # start-up check that CUDA is usable for them would (rightly) stop a real CPU job.
    world.cuda_problem = lambda: None
    args = parse_pretrain_args(argv, validate=False)
    args.bf16 = False  # fp32, so that the layouts agree to round-off
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    return args


def _run(layout: str, save: str, load, data_cache: str) -> dict:
    """Train `layout` from `load` (or from scratch) to ITERS, saving at iteration SAVED_AT into
    `save`; returns {iteration: loss} as the last pipeline stage reports it."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        update_num_microbatches,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.global_vars import set_global_variables, unset_global_variables
    from megatron.training.training import (
        build_train_valid_test_data_iterators,
        setup_model_and_optimizer,
        train_step,
    )

    from megatron_dirmoe.datasets import train_valid_test_datasets_provider
    from megatron_dirmoe.training.gpu import check_resume, forward_step, model_provider

    argv = [*COMMON, *LAYOUTS[layout], "--save", save, "--dirmoe-data-cache", data_cache]
    if load is not None:
        argv += ["--load", load]
    args = _parse(argv)
    unset_global_variables()
    destroy_num_microbatches_calculator()
    set_global_variables(args)  # the tokenizer sets the padded vocabulary, a model argument
    check_resume(args)  # what pretrain_on_cuda checks before Megatron loads
    args.iteration = 0
    args.consumed_train_samples = args.consumed_valid_samples = 0
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size)
    torch.manual_seed(args.seed)

    model, optimizer, scheduler = setup_model_and_optimizer(
        ModelType.encoder_or_decoder, model_provider)
    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    train_iter, _, _ = build_train_valid_test_data_iterators(train_valid_test_datasets_provider)
    aligner = _StepAligner()
    aligner.register(model)
    start, losses = args.iteration, {}
    iteration = start
    with aligner:
        while iteration < args.train_iters:
            args.curr_iteration = aligner.step = iteration
            aligner.reset()
            update_num_microbatches(args.consumed_train_samples, consistency_check=True)
            loss_dict, skipped, *_ = train_step(forward_step, train_iter, model, optimizer,
                                                scheduler, config, get_forward_backward_func(),
                                                iteration=iteration)
            assert not skipped
            iteration += 1
            args.iteration = iteration
            args.consumed_train_samples += args.global_batch_size
            if loss_dict:
                losses[iteration] = float(loss_dict["lm loss"])
            if iteration == SAVED_AT:  # only there: the resumes start from it
                save_checkpoint(iteration, model, optimizer, scheduler, 0)
    return dict(start=start, losses=losses, consumed=args.consumed_train_samples,
                lr=optimizer.param_groups[0]["lr"])


def run_resumes(rank: int, world_size: int, root: str, data_cache: str, plan: list) -> dict:
    """Worker: each (name, layout, load_from) of `plan` in turn; rank 0 returns every rank's
    views."""
    from megatron.training import arguments

    from cuda_shim import cuda_device_to_cpu

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      CUDA_DEVICE_MAX_CONNECTIONS="1")
    # Test-only: Megatron asks the CUDA device for its architecture when TP > 1 (to word a
    # warning) and saves the CUDA generator's state with the checkpoint; these ranks have none.
    arguments.get_device_arch_version = lambda: 0
    torch.cuda.get_rng_state = lambda device="cuda": torch.zeros(16, dtype=torch.uint8)
    results = {}
    with cuda_device_to_cpu():
        for name, layout, load_from in plan:
            load = None if load_from is None else os.path.join(root, load_from)
            try:
                view = _run(layout, os.path.join(root, name), load, data_cache)
            except ValueError as exc:  # a refused resume: every rank refuses alike
                view = dict(error=str(exc))
            views = [None] * world_size
            dist.all_gather_object(views, view)
            results[name] = views
            dist.barrier()
    return results


def _last_stage_losses(views) -> dict:
    reported = [v["losses"] for v in views if v["losses"]]
    assert reported and all(r == reported[0] for r in reported), reported
    return reported[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_dirmoe.data import prepare_embedded_corpus

    cache = tmp_path_factory.mktemp("embedded_corpus")
    prepare_embedded_corpus(cache)
    root = str(tmp_path_factory.mktemp("checkpoints"))
    four = spawn(4, run_resumes, root, str(cache), [
        ("tp2_ep2", "tp2_ep2", None),
        ("pp2", "pp2", None),
        ("tp2_ep2_to_ep4", "ep4", "tp2_ep2"),
    ])
    one = spawn(1, run_resumes, root, str(cache), [
        ("pp2_to_one_rank", "one_rank", "pp2"),
        ("tp2_ep2_to_one_rank", "one_rank", "tp2_ep2"),
    ])
    return {**four, **one}


@pytest.mark.parametrize("resumed, saved", [
    ("tp2_ep2_to_ep4", "tp2_ep2"),
    ("pp2_to_one_rank", "pp2"),
])
def test_resume_on_another_layout_continues_the_run(runs, resumed, saved):
    uninterrupted = _last_stage_losses(runs[saved])
    assert sorted(uninterrupted) == list(range(1, ITERS + 1))
    continued = _last_stage_losses(runs[resumed])
    for view in runs[resumed]:
        assert view["start"] == SAVED_AT  # the iteration came back
        assert view["consumed"] == ITERS * 4  # and the data position went on from 2 x 4
        assert view["lr"] == pytest.approx(runs[saved][0]["lr"], rel=1e-12)  # the LR schedule
    assert sorted(continued) == list(range(SAVED_AT + 1, ITERS + 1))
    for iteration, loss in continued.items():
        assert loss == pytest.approx(uninterrupted[iteration], rel=LOSS_RTOL), (
            iteration, continued, uninterrupted)
    # The run really learns between the two halves (so a wrong resume would show).
    assert uninterrupted[ITERS] != pytest.approx(uninterrupted[SAVED_AT], rel=1e-3)



def test_switching_expert_parallelism_off_stops_with_the_flags_to_use(runs):
    """TP2 x EP2 -> one rank: Megatron keeps the expert weights in an optimizer of their own only
    with EP > 1, and its loader fails deep inside ("Could not find parameter group") when that
    changes. The start-up check says why and what works instead."""
    (view,) = runs["tp2_ep2_to_one_rank"]
    assert "expert parallelism is switched off" in view["error"]
    assert "--no-load-optim" in view["error"] and "EP 2" in view["error"]
