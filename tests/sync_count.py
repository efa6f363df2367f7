"""Test-only counters: device-to-host synchronisations and collectives issued by a block.

`HostSyncCounter` counts, on CPU test ranks, the operations that synchronise the host with a
CUDA device when the tensor lives on one: reading a value (``item``, ``tolist``, ``bool``,
``float``, ``int``, formatting, ``numpy``), copying to the host (``cpu``, ``to("cpu")``) and
ops whose output size depends on the data (``nonzero``, ``unique``, boolean-mask indexing,
``bincount``...). On a CPU everything is a host tensor, so the counter tracks which tensors
came from a copy to the host (and everything computed from host tensors alone): work on those
is host work, free on a GPU run, and is not counted. Everything else stands for a device tensor.

`count_collectives` counts torch.distributed collectives (by name) issued inside a block.
"""

from __future__ import annotations

import collections
import contextlib
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncCounter", "count_collectives"]

_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__",
          "numpy", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select",
          "bincount", "repeat_interleave"}


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _to_host(name, args, kwargs) -> bool:
    if name == "cpu":
        return True
    if name == "to":
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        return (isinstance(target, str) and target.startswith("cpu")) or (
            isinstance(target, torch.device) and target.type == "cpu")
    return False


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: ...``; then ``syncs.count`` and ``syncs.sites``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.sites = collections.Counter()
        self._host = set()  # ids of host tensors (a WeakSet would compare tensors with ==)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        on_host = bool(inputs) and all(id(t) in self._host for t in inputs)
        boolean_index = name == "__getitem__" and any(
            t.dtype == torch.bool for t in _tensors(args[1:]))
        to_host = _to_host(name, args, kwargs)
        if not on_host and (name in _READS or boolean_index or to_host):
            self.count += 1
            self.sites[name] += 1
        out = func(*args, **kwargs)
        if on_host or to_host:
            for tensor in _tensors(out):
                if id(tensor) not in self._host:
                    self._host.add(id(tensor))
                    weakref.finalize(tensor, self._host.discard, id(tensor))
        return out


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast",
                "all_gather_object", "barrier", "send", "recv", "isend", "irecv")


@contextlib.contextmanager
def count_collectives():
    """Yields a Counter of the collectives (by name, and as ``(name, group size)``) called
    through ``torch.distributed`` inside the block; module attributes are patched back after."""
    counts = collections.Counter()
    saved = {}
    for name in _COLLECTIVES:
        original = getattr(dist, name)
        saved[name] = original

        def wrapper(*args, _original=original, _name=name, **kwargs):
            group = kwargs.get("group")
            size = dist.get_world_size(group) if dist.is_initialized() else 1
            counts[_name] += 1
            counts[(_name, size)] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapper)
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
