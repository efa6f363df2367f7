"""TEST-ONLY shim that lets Megatron-Core's multi-rank code paths run on CPU gloo ranks.

Megatron-Core 0.19.2 allocates communication buffers on ``torch.cuda.current_device()``, creates
CUDA streams/events in the all-to-all dispatcher, forks the CUDA RNG tracker in the embedding
under tensor parallelism, and hands all-to-all split sizes over as tensors (the CUDA path turns
them into host arrays on a side stream), and gathers uneven token counts across TP, which gloo
cannot do natively. None of that is about the maths we test, so this shim
redirects each of those points to the CPU. It must never be imported by the
package: it changes global torch state for the whole process.

`megatron.training`'s data-loader setup, the pipeline schedules, the optimizer and the default
causal mask also create tensors on a literal ``device="cuda"`` (and the optimizer checks for CUDA
tensor types); `cuda_device_to_cpu` (a torch function mode, used only around the code that needs
it because it sees every torch call) sends those to the CPU and names CPU types as CUDA ones.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

__all__ = ["install_cpu_cuda_shim", "shim_patches", "cuda_device_to_cpu"]

_INSTALLED = False


class _NullStream:
    """Stands in for `torch.cuda.Stream`: work is already ordered on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def synchronize(self):
        pass

    def __eq__(self, other):
        # One stream exists on the CPU, so every stream is "the current stream".
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


class _NullEvent:
    """Stands in for `torch.cuda.Event`."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


class _DoneWork:
    """A finished `Work` handle for collectives emulated synchronously."""

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


def _as_list(sizes):
    if sizes is None or isinstance(sizes, list):
        return sizes
    if torch.is_tensor(sizes):
        return [int(s) for s in sizes.tolist()]
    return [int(s) for s in sizes]  # numpy arrays, tuples


def shim_patches() -> list:
    """``(owner, attribute, replacement)`` triples; apply them with `install_cpu_cuda_shim`
    (for a whole process) or with pytest's ``monkeypatch.setattr`` (for one test)."""
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    stream = _NullStream()
    original_all_to_all_single = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        return original_all_to_all_single(
            output, input, _as_list(output_split_sizes), _as_list(input_split_sizes),
            group=group, async_op=async_op,
        )

    original_all_gather = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if all(t.shape == tensor.shape for t in tensor_list):
            return original_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        # Uneven along dim 0 (NCCL accepts it; gloo does not): pad to the longest, then trim.
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(padded) for _ in tensor_list]
        original_all_gather(buffers, padded, group=group)
        for out, buf in zip(tensor_list, buffers):
            out.copy_(buf[: out.shape[0]])
        return _DoneWork() if async_op else None

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        # gloo has no list reduce-scatter: reduce everything, keep this rank's part.
        flat = torch.cat([t.reshape(-1) for t in input_list])
        dist.all_reduce(flat, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.numel() for t in input_list[:rank])
        output.copy_(flat[start:start + output.numel()].view_as(output))
        return _DoneWork() if async_op else None

    return [
        # 1. Buffers Megatron allocates on "the current CUDA device" go to the CPU.
        (torch.cuda, "current_device", lambda: torch.device("cpu")),
        # 2. Streams and events: one in-order CPU "stream". The all-to-all dispatcher keeps its
        # side stream in a class attribute; reset it so it is created from the null class.
        (torch.cuda, "Stream", _NullStream),
        (torch.cuda, "Event", _NullEvent),
        (torch.cuda, "current_stream", lambda device=None: stream),
        (torch.cuda, "stream", lambda s=None: contextlib.nullcontext()),
        (torch.cuda, "synchronize", lambda device=None: None),
        (MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", None),
        # 3. The model-parallel RNG tracker forks the CUDA generator; with dropout 0 nothing
        # draws from it, so a no-op fork keeps the CPU generator untouched.
        (mp_random.CudaRNGStatesTracker, "fork", lambda self, name=None: contextlib.nullcontext()),
        # 4. gloo wants python lists for uneven all-to-all split sizes, and has neither uneven
        # all-gather nor list reduce-scatter (the all-to-all dispatcher's TP gather under SP).
        (dist, "all_to_all_single", all_to_all_single),
        (dist, "all_gather", all_gather),
        (dist, "reduce_scatter", reduce_scatter),
    ]


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaDeviceToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and torch.is_tensor(args[0]):  # tensor.cuda(...)
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs and torch.is_tensor(args[0]):
            # tensor.type(): Megatron's optimizer asserts CUDA types ('torch.cuda.FloatTensor')
            # before its (fallback) kernels; the CPU tensor stands in for the CUDA one.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):  # factories and tensor.to(device=...)
            kwargs = {**kwargs, "device": "cpu"}
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):  # tensor.to("cuda", ...)
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def cuda_device_to_cpu() -> TorchFunctionMode:
    """``with cuda_device_to_cpu(): ...``: tensors created on (or moved to) "cuda" stay on the
    CPU inside the block."""
    return _CudaDeviceToCpu()


def install_cpu_cuda_shim() -> None:
    """Apply the shim for the rest of this process (spawned test ranks only; idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    for owner, name, value in shim_patches():
        setattr(owner, name, value)
