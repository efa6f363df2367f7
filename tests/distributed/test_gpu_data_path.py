"""The GPU path's data flow on CPU gloo ranks: TP and PP layouts give the single-rank loss.

Four ranks run `megatron_dirmoe.training.gpu.forward_step` through Megatron's
`get_forward_backward_func` schedule, fed by the data iterators that `megatron.training.pretrain`
builds (`build_train_valid_test_data_iterators` with our `train_valid_test_datasets_provider`) on
the embedded corpus. As under `pretrain`, only tensor-parallel rank 0 of the first and last
pipeline stages gets a data iterator: the other TP ranks receive their micro-batches by broadcast
and middle stages read none. Each layout copies the weights of a one-rank model (built on every
rank, as in `harness.py`) and must give that model's loss on the same global batch (eval mode: no
routing noise) to 1e-5. The CUDA-only calls on the way are redirected to the CPU by `cuda_shim.py`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os

import pytest
import torch
import torch.distributed as dist

from harness import _assemble, _chunks, _load_full, spawn

LOSS_RTOL = 1e-5
SEED = 1234

# --init-method-std 0.2: large enough weights that the loss clearly depends on every token read
# (at 0.02 a random model's loss is close to ln V whatever its input).
COMMON = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 "
    "--moe-ffn-hidden-size 128 --num-experts 4 --seq-length 64 --max-position-embeddings 64 "
    "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --eval-iters 1 "
    "--eval-interval 10 --transformer-impl local --use-cpu-initialization "
    "--init-method-std 0.2 --dirmoe-device cuda --dirmoe-no-torch-compile --dirmoe-target-k 1 "
    "--num-workers 0"
).split()

# All on 4 ranks; the data-parallel size is what remains (2 for the first two).
LAYOUTS = {
    "tp2_dp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2_dp2": ["--pipeline-model-parallel-size", "2"],
    "pp4": ["--pipeline-model-parallel-size", "4"],  # two middle stages
    "tp2_pp2_no_dataloader_mask": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                   "--pipeline-model-parallel-size", "2",
                                   "--no-create-attention-mask-in-dataloader"],
}


def _parse(argv):
    from megatron.training.arguments import validate_args

    from megatron_dirmoe.training.arguments import parse_pretrain_args

    args = parse_pretrain_args(argv, validate=False)
    args.bf16 = False  # the GPU path's bf16 default; these ranks compare fp32 losses
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    return args


def _set_globals(args) -> None:
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training.global_vars import set_global_variables, unset_global_variables

    unset_global_variables()
    destroy_num_microbatches_calculator()
    set_global_variables(args)
    # What `pretrain` has set by the time it builds the data iterators (fresh run).
    args.iteration = 0
    args.consumed_train_samples = args.consumed_valid_samples = 0


def _init_parallel(tp: int = 1, pp: int = 1) -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _reference(args):
    """The one-rank model (full weights) and its loss on the first global batch of the training
    split, read straight from the dataset in sample order."""
    from megatron.training import get_tokenizer
    from megatron.training.training import get_train_valid_test_num_samples

    from megatron_dirmoe.datasets import build_gpt_datasets
    from megatron_dirmoe.training.builders import build_model_from_args

    _init_parallel()
    one = copy.copy(args)
    one.tensor_model_parallel_size = one.pipeline_model_parallel_size = 1
    one.sequence_parallel = False
    torch.manual_seed(SEED)
    model = build_model_from_args(one).eval()
    # Same sizes as megatron.training's loaders ask for, so the same sample order.
    train_ds, _, _ = build_gpt_datasets(args, get_tokenizer(), get_train_valid_test_num_samples())
    samples = [train_ds[i] for i in range(args.global_batch_size)]
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
             for key in ("tokens", "labels", "loss_mask", "position_ids")}
    mask = samples[0].get("attention_mask")
    mask = None if mask is None else torch.stack([torch.as_tensor(s["attention_mask"])
                                                  for s in samples])
    with torch.no_grad():
        losses = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    loss_mask = batch["loss_mask"].float()
    loss = ((losses.float() * loss_mask).sum() / loss_mask.sum()).item()
    weights, _ = _assemble(_chunks(model, grads=False))
    return weights, loss


def _run_layout(args, weights):
    """This rank's view of one step of `pretrain`'s eval-mode forward over one global batch."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training.training import build_train_valid_test_data_iterators

    from megatron_dirmoe.datasets import train_valid_test_datasets_provider
    from megatron_dirmoe.training.gpu import forward_step, model_provider

    _init_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    torch.manual_seed(SEED + 1)  # a different init on purpose: the weights come from `weights`
    model = model_provider(pre_process=ps.is_pipeline_first_stage(),
                           post_process=ps.is_pipeline_last_stage())
    _load_full(model, weights)
    model.eval()
    train_iter, _, _ = build_train_valid_test_data_iterators(train_valid_test_datasets_provider)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=train_iter,
        model=[model],
        num_microbatches=get_num_microbatches(),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=True,
    )
    view = dict(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        has_iterator=train_iter is not None,
        microbatches=get_num_microbatches(),
        loss=None,
    )
    if ps.is_pipeline_last_stage():
        # Per micro-batch [sum of token losses, token count]; summed over DP like Megatron's
        # logging, this is the global batch's mean token loss.
        total = torch.stack([out["lm loss"] for out in outputs]).sum(0).double()
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        view["loss"] = (total[0] / total[1]).item()
        view["tokens"] = int(total[1])
    return view


def run_layouts(rank: int, world_size: int, data_cache: str) -> dict:
    from megatron.training import arguments

    from cuda_shim import cuda_device_to_cpu

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      CUDA_DEVICE_MAX_CONNECTIONS="1")  # what a TP launch script exports
    # Test-only: Megatron's argument validation asks the CUDA device for its architecture when
    # TP > 1 (to word a performance warning); these CPU ranks have none.
    arguments.get_device_arch_version = lambda: 0
    # These CPU ranks stand in for the GPU ranks of a torchrun job (--dirmoe-device cuda): the
    # start-up check that CUDA is usable for them would (rightly) stop a real CPU job.
    from megatron_dirmoe.training import world

    world.cuda_problem = lambda: None
    results, reference = {}, None
    with cuda_device_to_cpu():
        for name, flags in LAYOUTS.items():
            args = _parse([*COMMON, *flags, "--dirmoe-data-cache", data_cache])
            _set_globals(args)
            if reference is None:  # the same model and data for every layout
                reference = _reference(args)
            weights, ref_loss = reference
            view = _run_layout(args, weights)
            views = [None] * world_size
            dist.all_gather_object(views, view)
            results[name] = dict(ref_loss=ref_loss, views=views,
                                 dp=args.data_parallel_size,
                                 mask=args.create_attention_mask_in_dataloader)
            dist.barrier()
    return results


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    from megatron_dirmoe.data import prepare_embedded_corpus

    cache = tmp_path_factory.mktemp("embedded_corpus")
    prepare_embedded_corpus(cache)  # once here, so the ranks only read it
    return spawn(4, run_layouts, str(cache))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reads_megatron_batches_and_matches_single_rank(layouts, name):
    result = layouts[name]
    views = result["views"]
    num_pp = 1 + max(v["pp_rank"] for v in views)
    for view in views:
        # megatron.training's data path: loaders on TP rank 0 of the first/last stage only.
        reads = view["tp_rank"] == 0 and view["pp_rank"] in (0, num_pp - 1)
        assert view["has_iterator"] == reads, view
    assert (num_pp > 2) == any(v["pp_rank"] not in (0, num_pp - 1) for v in views)
    last = [v for v in views if v["pp_rank"] == num_pp - 1]
    assert all(v["microbatches"] == 8 // 2 // result["dp"] for v in views)
    assert all(v["tokens"] == 8 * 64 for v in last)  # the whole global batch, every token once
    for view in last:  # every DP and TP rank of the last stage reports the same loss
        assert view["loss"] == pytest.approx(result["ref_loss"], rel=LOSS_RTOL), name
