"""A quiet start: known-benign start-up warnings collapsed into one line.

Importing Megatron-Core without Transformer Engine or NVIDIA apex (any CPU machine, many GPU
ones) prints a dozen ``UserWarning``\\ s that all say the same thing (PyTorch fallbacks are used),
and a few log records that concern Megatron itself rather than the user (a deprecation notice for
``GPTModel``, a misleading "async save is deprecated" for a synchronous save, torch's
"No CUDA runtime is found" on a machine without CUDA, "Could not determine rank" in a one-process
run, torch's ShardedTensor deprecation and load-signature notices when Megatron loads a checkpoint
to resume). :func:`install` hides exactly these messages (``warnings`` filters by category,
module and message; ``logging`` filters on the emitting loggers by message) and prints one line
instead::

    [dirmoe] Transformer Engine / NVIDIA apex not installed: Megatron uses PyTorch fallbacks
    (fine on CPU; on GPUs install TE for fused kernels: pip install -e '.[te]')

Megatron-Core's INFO records that restate the run's own settings at start-up (the dataset
builder's ~25 lines about index files and sample counts, the micro-batch count, the LR decay
style) are hidden too: their loggers are set to WARNING. Megatron's own level controls bring them
back: ``--logging-level 20`` (or ``MEGATRON_LOGGING_LEVEL=20``) sets that level for every logger,
as `megatron.training` does, on the CPU loop as well.

Any other warning still shows. ``DIRMOE_STARTUP_WARNINGS=all`` turns the filtering off (every
message is printed as Megatron emits it). Neither torch nor Megatron is modified; only the
standard warning filters and logger filters are added, so call :func:`install` before Megatron is
imported (the ``dirmoe-pretrain`` entry does it first thing).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings
from typing import Optional, TextIO

__all__ = ["install", "summary_line", "apply_logging_level", "WARNING_MESSAGES", "LOG_MESSAGES",
           "QUIET_INFO_LOGGERS", "ENV_SHOW_ALL", "ENV_MEGATRON_LEVEL"]

ENV_SHOW_ALL = "DIRMOE_STARTUP_WARNINGS"
# Megatron's environment variable for the logging level (`megatron.training.initialize`).
ENV_MEGATRON_LEVEL = "MEGATRON_LOGGING_LEVEL"

# (message regex, category, module regex) of warnings that say TE / apex is missing. The message
# is matched at its start (case-insensitively, as `warnings.filterwarnings` does), the module is
# the one that raised it (Megatron's own).
_TE_APEX_WARNINGS = (
    (r"Transformer Engine and Apex are not installed\.", UserWarning, r"megatron\."),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, r"megatron\."),
    # get_te_version() is 0.0.0 when TE is not installed at all (an old TE still warns).
    (r"Only transformer-engine>=1\.7\.0 supports MoE experts, but your version is 0\.0\.0\.",
     UserWarning, r"megatron\."),
)
_OTHER_WARNINGS = (
    # absl-py comes with tensorboard; without it Megatron's logging works the same.
    (r"absl\.logging is not installed\. Using logging\.getLogger", UserWarning, r"megatron\."),
    # Loading a checkpoint (resume): Megatron's distributed checkpoints are built on torch's
    # ShardedTensor and call torch's load with positional arguments; both work as intended.
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
     r"torch\.distributed\.checkpoint\."),
    (r"The argument order of load has been changed", UserWarning,
     r"torch\.distributed\.checkpoint\."),
)
# Only benign in a one-process run; under a launcher (WORLD_SIZE > 1) they stay visible.
_SINGLE_PROCESS_WARNINGS = (
    (r"Could not determine rank from torch\.distributed, RANK, or SLURM_PROCID\. "
     r"Defaulting to rank 0\.", UserWarning, r"megatron\."),
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
     r"load in a single process", UserWarning, r"torch\.distributed\.checkpoint\."),
)
WARNING_MESSAGES = _TE_APEX_WARNINGS + _OTHER_WARNINGS + _SINGLE_PROCESS_WARNINGS

# logger name -> message regexes of records dropped from that logger.
LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    # torch, when the CUDA toolkit path is probed on a machine without a CUDA runtime.
    "torch.utils.cpp_extension": (r"No CUDA runtime is found",),
    # Megatron 0.19 announces HybridModel; GPTModel is what Megatron-LM's pretrain_gpt builds.
    "megatron.core.models.gpt.gpt_model": (r"GPTModel IS DEPRECATED",),
    # Megatron's synchronous save calls its own async path with async_strategy="mcore".
    "megatron.core.dist_checkpointing.strategies.torch": (r"MCore's async save is deprecated",),
}


# Loggers whose INFO records restate the run's settings at start-up; quiet (WARNING) by default.
QUIET_INFO_LOGGERS = (
    "megatron.core.datasets",  # BlendedMegatronDatasetBuilder, GPTDataset, the index readers
    "megatron.core.num_microbatches_calculator",
    "megatron.core.optimizer_param_scheduler",
)
_quieted: list[str] = []


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches one of `patterns`."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is someone else's problem: let it through
            return True
        return not any(p.match(message) for p in self.patterns)


_printed = False


def _missing() -> list[str]:
    names = []
    if importlib.util.find_spec("transformer_engine") is None:
        names.append("Transformer Engine")
    if importlib.util.find_spec("apex") is None:
        names.append("NVIDIA apex")
    return names


def summary_line() -> Optional[str]:
    """The one line that replaces the TE / apex warnings (None when both are installed)."""
    missing = _missing()
    if not missing:
        return None
    return (f"[dirmoe] {' / '.join(missing)} not installed: Megatron uses PyTorch fallbacks "
            "(fine on CPU; on GPUs install TE for fused kernels: pip install -e '.[te]'). "
            f"{ENV_SHOW_ALL}=all shows every start-up warning.")


def _one_process() -> bool:
    return os.environ.get("WORLD_SIZE", "1") == "1" and os.environ.get("SLURM_NTASKS", "1") == "1"


def install(stream: Optional[TextIO] = None, *, summary: bool = True) -> bool:
    """Add the filters (idempotent) and print the summary line once per process on rank 0
    (``summary=False``: no line, for tools such as ``dirmoe-preprocess`` that run no model).

    Returns False (and changes nothing) when ``DIRMOE_STARTUP_WARNINGS=all``."""
    global _printed
    if os.environ.get(ENV_SHOW_ALL, "").lower() in ("all", "1", "show"):
        return False
    messages = _TE_APEX_WARNINGS + _OTHER_WARNINGS
    if _one_process():
        messages += _SINGLE_PROCESS_WARNINGS
    for message, category, module in messages:
        # filterwarnings removes an identical earlier entry first, so repeated calls add nothing.
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
    if os.environ.get(ENV_MEGATRON_LEVEL) is None:
        for name in QUIET_INFO_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:  # a level someone chose stays
                logger.setLevel(logging.WARNING)
                _quieted.append(name)
    line = summary_line() if summary else None
    if line and not _printed and os.environ.get("RANK", "0") == "0":
        print(line, file=stream or sys.stderr, flush=True)
    _printed = _printed or line is not None
    return True


def apply_logging_level(level: Optional[int]) -> None:
    """Megatron's ``--logging-level`` (None: not given): an explicit level lifts the quiet start
    and applies to every logger, as `megatron.training.initialize.setup_logging` does (the
    CPU loop does not run Megatron's initialisation, so the entry calls this)."""
    env = os.environ.get(ENV_MEGATRON_LEVEL)
    if level is None and env is None:
        return
    while _quieted:
        logging.getLogger(_quieted.pop()).setLevel(logging.NOTSET)
    logging.getLogger().setLevel(int(level if level is not None else env))
