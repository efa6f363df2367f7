"""Multi-rank CPU harness: spawn gloo ranks, compare a parallel DirMoE GPT with one rank.

Every rank first computes the single-rank reference itself (Megatron parallel state with all
sizes 1, the full batch, the same seed), then re-initialises the parallel state with the layout
under test, builds the same tiny GPT, copies the reference weights into its shards through
Megatron's own ``sharded_state_dict`` (which knows how every parameter is split over TP/EP/PP),
runs forward and backward, reduces gradients the way Megatron's DDP + ``finalize_model_grads``
would, and sends its gradient shards to rank 0. Rank 0 assembles full tensors (checking that every
element is covered and that replicas agree) and compares them with the reference.

Data parallelism. Each data-parallel replica's router losses are those of its own micro-batch
(the balance statistic is reduced over TP x CP only, as Megatron's default aux loss), so a layout
with DP replicas equals one rank that runs the replicas' micro-batches one after another with
gradient accumulation: the reference splits the batch into that many micro-batches (the DP
replicas' slices, in rank order). Within a micro-batch, TP (sequence parallel) and EP must not
change anything.

Training-mode noise. DirMoE draws Gumbel and Dirichlet noise from the global RNG inside
``routing.route``; under sequence parallelism each rank routes only its own tokens, so the
draws cannot coincide with a one-rank run. The harness therefore wraps ``route`` (test-only): in
training mode it gathers the routing logits of a micro-batch's sequence shards into the
single-rank token order, draws the noise for the whole micro-batch from the global generator
seeded by (layer, global micro-batch index), and keeps this rank's rows. The gather's backward
returns this rank's slice (every rank recomputes the full routing, so no gradient has to
travel). The reference goes through the same wrapper, so both see identical noise per token, and
training mode is compared as tightly as eval mode. (With more than one token shard the router draws inside its own routing-noise stream,
`megatron_dirmoe.router.routing_noise_rng`; the wrapper reseeds inside that fork, so its seeding
decides the draws.) That ranks routing different tokens really draw different noise is tested in
`test_routing_noise.py`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

VOCAB, SEQ, BATCH, HIDDEN = 64, 16, 4, 32
SEED = 1234
NOISE_SEED = 4321


# ---------------------------------------------------------------------- process spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, worker, args, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # CI has 2 cores for up to 4 ranks
    from cuda_shim import install_cpu_cuda_shim

    install_cpu_cuda_shim()
    # A bounded timeout turns a hang (mismatched collectives) into an error in CI.
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=180))
    try:
        result = worker(rank, world_size, *args)
        if rank == 0:
            torch.save(result, result_path)
    except Exception:
        # Make the failing rank's traceback visible even if another rank hangs first.
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn(world_size: int, worker, *args) -> Any:
    """Run ``worker(rank, world_size, *args)`` on `world_size` gloo CPU ranks; returns rank 0's
    return value. `worker` must be importable (defined at module level)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        mp.spawn(
            _entry, args=(world_size, _free_port(), worker, args, path), nprocs=world_size,
            join=True,
        )
        return torch.load(path, weights_only=False)


# ---------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One parallel layout to compare with the single-rank reference."""

    name: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1  # expert tensor parallel size
    dispatcher: str = "allgather"
    num_experts: int = 4
    training: bool = False
    # "dead_rank": experts on the second half never chosen (one EP rank receives no tokens);
    # "single": every token goes to expert 0 only.
    forced: Optional[str] = None
    padding: bool = False
    num_layers: int = 2
    # Micro-batches per step (only with DP = 1): the first PP stage then has several forwards
    # in flight before the first backward, as in a real pipeline schedule.
    microbatches: int = 1


# ---------------------------------------------------------------------- model pieces
def _transformer_config(case: Case, tp: int, pp: int, ep: int):
    from tiny_config import tiny_transformer_config

    dcfg = _dirmoe_config(case)
    return tiny_transformer_config(
        num_layers=case.num_layers,
        hidden_size=HIDDEN,
        num_moe_experts=case.num_experts,
        moe_router_topk=dcfg.max_active_for(case.num_experts),
        moe_ffn_hidden_size=48,
        ffn_hidden_size=48,
        moe_token_dispatcher_type=case.dispatcher,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=case.etp if tp > 1 else 1,
        sequence_parallel=tp > 1,
    )


def _dirmoe_config(case: Case):
    from megatron_dirmoe.config import DirMoEConfig

    # max_active < E so the cap (and moe_router_topk as an upper bound) is exercised.
    return DirMoEConfig(target_k=2, max_active=3, schedule_iters=100, torch_compile=False)


def _build(case: Case, tp: int, pp: int, ep: int):
    from megatron.core import parallel_state as ps

    from megatron_dirmoe.model import build_gpt_model

    config = _transformer_config(case, tp, pp, ep)
    model = build_gpt_model(
        config,
        _dirmoe_config(case),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        use_te=False,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    model.train(case.training)
    return model


def _shape_routing(model, forced: Optional[str]) -> None:
    """Set router weights so routing is interesting (or forced) in the reference.

    At initialisation every gate of this tiny model opens in eval mode (k = max_active for every
    token, which a fixed-k dispatcher would also handle), so by default the spike logits are
    sharpened and the biases spread: tokens then route to 1..max_active experts. `forced` makes
    part of the routing independent of the data: "dead_rank" never chooses the second half of the
    experts (their spike logits are a large negative bias; the first half keeps data-dependent
    logits so that each of its experts is chosen by some tokens), "single" chooses expert 0 alone.
    """
    from megatron_dirmoe.router import iter_dirichlet_routers

    for router in iter_dirichlet_routers(model):
        E = router.num_experts
        with torch.no_grad():
            if forced is None:
                router.weight[:E].mul_(30.0)
                router.spike_bias.copy_(torch.linspace(-2.0, 1.0, E))
                continue
            if forced == "dead_rank":
                half = E // 2
                router.weight[:half].mul_(30.0)
                router.weight[half:E].zero_()
                bias = [0.0] * half + [-400.0] * (E - half)
            elif forced == "single":
                router.weight[:E].zero_()
                bias = [8.0] + [-40.0] * (E - 1)
            else:
                raise ValueError(forced)
            router.spike_bias.copy_(torch.tensor(bias))


def _batch():
    """Identical on every rank: tokens, labels [B, S] and a padding mask (True = padding)."""
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    # Right-padded rows of different lengths. The router averages its losses over the real
    # tokens of each data-parallel rank (Megatron's per-micro-batch semantics), which equals the
    # one-rank mean only when DP ranks hold equally many real tokens: rows {0,1} and {2,3} do.
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    for row, pad in enumerate((3, 5, 5, 3)):
        padding[row, SEQ - pad:] = True
    return tokens[:, :-1], tokens[:, 1:], padding


# ---------------------------------------------------------------------- routing-noise wrapper
class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0; backward keeps this rank's rows (see module docstring)."""

    @staticmethod
    def forward(ctx, x, group):
        size = dist.get_world_size(group)
        ctx.rank, ctx.rows = dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows), None


class _NoiseAligner:
    """Wraps `megatron_dirmoe.router.route` so that training noise is a function of the
    (layer, global token) pair, identical for the reference and every parallel layout."""

    def __init__(self):
        from megatron_dirmoe import router as router_module

        self.module = router_module
        self.route = router_module.route
        self.layer_of = {}
        self.calls = {}  # routing calls per layer since `reset` (one per micro-batch)
        self.single = False  # the reference: one rank's view, nothing to gather
        self.per_rank = 1  # micro-batches per DP rank (global index = dp_rank x this + call)

    def index(self, dp_rank: int, call: int) -> int:
        """The micro-batch's place in the global batch (its noise seed): the DP ranks' slices
        follow each other, `per_rank` micro-batches each."""
        return dp_rank * self.per_rank + call

    def register(self, model) -> None:
        from megatron_dirmoe.router import iter_dirichlet_routers

        for router in iter_dirichlet_routers(model):
            self.layer_of[id(router.spike_bias)] = router.layer_number

    def reset(self) -> None:
        self.calls.clear()

    def __enter__(self):
        self.module.route = self._route
        return self

    def __exit__(self, *exc):
        self.module.route = self.route

    def _route(self, spike_TE, slab_TE, spike_bias_E, *, training, **kwargs):
        if not training:
            return self.route(spike_TE, slab_TE, spike_bias_E, training=training, **kwargs)
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
        tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        dp_rank = ps.get_data_parallel_rank()
        if self.single:
            tp, tp_rank, dp_rank = 1, 0, 0
        T_local = spike_TE.shape[0]

        # Rows are [s, b] flattened (s major) and SP shards s contiguously, so the micro-batch's
        # rows are the TP shards' rows concatenated in rank order.
        def to_global(x):  # None: the calibrated recipe's slab reads the gate logits
            return _GatherRows.apply(x, tp_group) if tp > 1 and x is not None else x

        def to_local(x):
            if not torch.is_tensor(x) or x.dim() == 0:
                return x
            return x[tp_rank * T_local:(tp_rank + 1) * T_local]

        layer = self.layer_of[id(spike_bias_E)]
        call = self.calls[layer] = self.calls.get(layer, -1) + 1
        index = self.index(dp_rank, call)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(NOISE_SEED + 1000 * index + layer)
            full = self.route(to_global(spike_TE), to_global(slab_TE), spike_bias_E,
                              training=training, **kwargs)
        return dataclasses.replace(
            full, **{f.name: to_local(getattr(full, f.name)) for f in dataclasses.fields(full)}
        )


# ---------------------------------------------------------------------- state <-> full tensors
def _chunks(model, grads: bool) -> list:
    """(key, global_shape, slices, tensor) for every sharded tensor of `model`; with
    `grads=True` the tensors are the parameters' gradients instead of their values."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    saved = {}
    if grads:
        for p in model.parameters():
            saved[p] = p.data
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    try:
        sd = model.sharded_state_dict()
        apply_factories(sd)
        out = []
        for sh in nested_values(sd):
            if not isinstance(sh, ShardedTensor):
                continue
            assert sh.flattened_range is None
            local = sh.data.reshape((1,) * sh.prepend_axis_num + tuple(sh.data.shape))
            slices = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, local.shape))
            out.append((sh.key, tuple(sh.global_shape), slices, local))
        return out
    finally:
        for p, data in saved.items():
            p.data = data


def _assemble(chunks: list, check_cover: bool = True) -> tuple[dict, float]:
    """Full tensors from chunks of all ranks; also the largest disagreement between replicas."""
    full, seen, replica_err = {}, {}, 0.0
    for key, shape, slices, data in chunks:
        if key not in full:
            full[key] = torch.zeros(shape, dtype=data.dtype)
            seen[key] = torch.zeros(shape, dtype=torch.bool)
        region, covered = full[key][slices], seen[key][slices]
        if covered.any():
            replica_err = max(replica_err, (region - data)[covered].abs().max().item())
        region.copy_(data)
        covered.fill_(True)
    if check_cover:
        for key, mask in seen.items():
            if not mask.all():
                raise AssertionError(f"{key}: {int((~mask).sum())} elements on no rank")
    return full, replica_err


def _load_full(model, full: dict) -> None:
    """Copy slices of full tensors into this rank's shards; every parameter must be written."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        for key, _, slices, local in _chunks(model, grads=False):
            local.copy_(full[key][slices])
        for name, p in model.named_parameters():
            if torch.isnan(p).any():
                raise AssertionError(f"{name} was not loaded from the reference")


# ---------------------------------------------------------------------- one step
def _finalize_grads(model, tp: int) -> None:
    """What Megatron's DDP + finalize_model_grads do, unbucketed: SP-replicated params are
    summed over TP, dense params over DP, expert params over the expert-DP group (the loss was
    already divided by the DP size, as DDP's averaging does)."""
    from megatron.core import parallel_state as ps

    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if tp > 1 and getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        if getattr(p, "allreduce", True):
            dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
        else:
            dist.all_reduce(p.grad, group=ps.get_expert_data_parallel_group())


def _step(model, case: Case, single: bool = False, microbatches: int = 1) -> Optional[float]:
    """Forward + backward of this rank's DP slice of the batch in `case.microbatches`
    micro-batches, driving the pipeline stages by hand (GPipe order: the first stage runs every
    forward before any backward, so several micro-batches are in flight); returns the mean loss
    over the whole batch on the last stage. `single`: the reference, the whole batch on this rank
    alone in `microbatches` micro-batches (the parallel state has all model-parallel sizes 1 but
    DP = world size, which the reference must ignore)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    m = case.microbatches
    if single:
        dp, dp_rank, m = 1, 0, microbatches
    if m > 1 and dp > 1:
        raise ValueError("micro-batches > 1 only with DP = 1 (the reference splits the batch)")
    tokens, labels, padding = _batch()
    rows = BATCH // dp // m
    position_ids = torch.arange(SEQ)[None].expand(rows, -1)

    def micro_batch(i):
        sl = slice(dp_rank * BATCH // dp + i * rows, dp_rank * BATCH // dp + (i + 1) * rows)
        kwargs = dict(padding_mask=padding[sl]) if case.padding else {}
        return tokens[sl], labels[sl], kwargs

    # DDP averages gradients over DP and the schedule over micro-batches; the aux losses follow
    # the main loss scale (what Megatron's schedule sets).
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / (dp * m)))
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    prev_rank, next_rank = (
        ps.get_pipeline_model_parallel_prev_rank(), ps.get_pipeline_model_parallel_next_rank()
    )
    act_shape = (SEQ // ps.get_tensor_model_parallel_world_size(), rows, HIDDEN)
    losses, outputs, pending = [], [], []
    for i in range(m):
        tok, lab, kwargs = micro_batch(i)
        recv = None
        if not first:
            recv = torch.empty(act_shape)
            dist.recv(recv, src=prev_rank)
            recv.requires_grad_(True)
            model.set_input_tensor(recv)
        if last:
            loss = model(tok, position_ids, None, labels=lab, **kwargs).mean()
            (loss / (dp * m)).backward()
            losses.append(loss.detach())
            if recv is not None:
                pending.append(dist.isend(recv.grad.contiguous(), dst=prev_rank))
        else:
            out = model(tok, position_ids, None, **kwargs)
            pending.append(dist.isend(out.detach().contiguous(), dst=next_rank))
            outputs.append(out)
    for out in outputs:  # first stages: backward of every micro-batch after all forwards
        grad = torch.empty_like(out)
        dist.recv(grad, src=next_rank)
        out.backward(grad)
    for work in pending:
        work.wait()

    if single:
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return torch.stack(losses).mean().item()
    _finalize_grads(model, ps.get_tensor_model_parallel_world_size())
    if not last:
        return None
    loss = torch.stack(losses).mean()
    dist.all_reduce(loss, group=ps.get_data_parallel_group())
    return (loss / dp).item()


def _init_parallel(tp: int = 1, pp: int = 1, ep: int = 1, etp: int = 1) -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def _data_parallel_size(case: Case) -> int:
    return dist.get_world_size() // (case.tp * case.pp)


def _reference(case: Case, aligner: _NoiseAligner) -> dict:
    """Single-rank loss, weights and gradients (computed redundantly on every rank): the batch
    in one micro-batch per DP replica of `case` (times its own micro-batches)."""
    _init_parallel()
    torch.manual_seed(SEED)
    model = _build(dataclasses.replace(case, dispatcher="allgather"), 1, 1, 1)
    _shape_routing(model, case.forced)
    aligner.register(model)
    aligner.single = True
    aligner.reset()
    # Mean experts per real token over all layers: shows that k really varies per token. Counted
    # from the routing maps the routers return (their expert-load statistic is training-only).
    from megatron_dirmoe.router import iter_dirichlet_routers

    routed = []
    hooks = [r.register_forward_hook(lambda m, i, out: routed.append(float(out[1].sum())))
             for r in iter_dirichlet_routers(model)]
    try:
        with aligner:
            loss = _step(model, case, single=True,
                         microbatches=case.microbatches * _data_parallel_size(case))
    finally:
        aligner.single = False
        for hook in hooks:
            hook.remove()
    weights, _ = _assemble(_chunks(model, grads=False))
    grads, _ = _assemble(_chunks(model, grads=True))
    pairs = sum(routed)
    real_tokens = BATCH * SEQ - (int(_batch()[2].sum()) if case.padding else 0)
    mean_k = pairs / (real_tokens * case.num_layers)
    return dict(loss=loss, weights=weights, grads=grads, mean_k=mean_k)


def run_cases(rank: int, world_size: int, cases: list) -> dict:
    """Worker: for each case, reference then parallel run; rank 0 returns per-case errors."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    aligner = _NoiseAligner()
    results, refs = {}, {}
    for case in cases:
        ref_key = (case.num_experts, case.training, case.forced, case.padding, case.num_layers,
                   case.microbatches * _data_parallel_size(case))
        if ref_key not in refs:
            refs[ref_key] = _reference(case, aligner)
        ref = refs[ref_key]

        _init_parallel(case.tp, case.pp, case.ep, case.etp)
        torch.manual_seed(SEED + 1)  # different init on purpose: weights come from the reference
        model = _build(case, case.tp, case.pp, case.ep)
        _load_full(model, ref["weights"])
        aligner.register(model)
        aligner.reset()
        aligner.per_rank = case.microbatches
        with aligner:
            loss = _step(model, case)
        get_moe_metrics_tracker().clear()

        losses = [None] * world_size
        dist.all_gather_object(losses, loss)
        chunks = [None] * world_size
        dist.all_gather_object(chunks, _chunks(model, grads=True))
        if rank != 0:
            continue
        loss = next(value for value in losses if value is not None)
        grads, replica_err = _assemble([c for rank_chunks in chunks for c in rank_chunks])
        assert grads.keys() == ref["grads"].keys(), set(grads) ^ set(ref["grads"])
        # Relative to the tensor's largest reference entry; the 1e-6 floor keeps gradients that
        # are zero up to round-off (saturated gates under forced routing, ~1e-13) from dividing
        # round-off by round-off.
        grad_err = {
            key: ((grads[key] - ref_grad).abs().max() / (ref_grad.abs().max() + 1e-6)).item()
            for key, ref_grad in ref["grads"].items()
        }
        fc1 = next(k for k in grads if k.endswith("experts.experts.linear_fc1.weight"))
        results[case.name] = dict(
            # [layers, experts]: which experts received any gradient (i.e. any token)
            expert_grad_max=grads[fc1].flatten(2).abs().amax(-1),
            loss=loss,
            ref_loss=ref["loss"],
            mean_k=ref["mean_k"],
            grad_rel_err=grad_err,
            ref_grad_max={k: g.abs().max().item() for k, g in ref["grads"].items()},
            replica_err=replica_err,
            num_grads=len(grad_err),
            zero_ref_grads=sorted(k for k, g in ref["grads"].items() if g.abs().max() == 0),
        )
    return results
