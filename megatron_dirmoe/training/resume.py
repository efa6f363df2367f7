"""What a run resumes from, checked before any weight is loaded.

:func:`check_resume` runs at start-up on both training paths (the CPU loop and
`megatron.training` on GPUs), after the tokenizer is built and before the model is:

1. **Which checkpoint.** ``--load``'s ``latest_checkpointed_iteration.txt``, or ``--ckpt-step N``
   (Megatron's flag, honoured by the CPU loop too). A ``--load`` that names one checkpoint's own
   directory, a tracker that names a missing iteration, or checkpoints without a tracker stop with
   the directory and the fix.
2. **Integrity** (:func:`checkpoint_problems`). ``metadata.json`` and the torch-distributed
   ``.metadata`` are present and readable, every shard file the metadata records is present and
   at least as long as the byte range recorded for it (the format records offset and length of
   every item). A damaged checkpoint is reported by file together with the newest intact earlier
   checkpoint and the flag that loads it (``--ckpt-step``). Nothing falls back silently.
3. **The same model** (:func:`model_arg_changes`). The model-defining arguments saved with the
   checkpoint (:data:`MODEL_ARGS`: layer count and sizes, experts, attention layout, norms,
   vocabulary) against the given ones; a difference stops the run with each flag's saved and
   given value. The parallel layout is not among them: a checkpoint resumes on another layout.
4. **The same router settings**: `checkpointing.check_resume_config` (DirMoE settings and
   schedule horizon; ``--dirmoe-allow-config-change`` continues anyway).

Presets keep one default directory per model shape (:func:`preset_directory`), so changing
``--num-experts`` on ``--preset tiny`` starts a new run instead of loading the preset's.

Importing this module imports neither torch nor Megatron.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_dirmoe.errors import UserError

__all__ = [
    "MODEL_ARGS",
    "PRESET_KEY_ARGS",
    "ResumePoint",
    "check_resume",
    "checkpoint_problems",
    "find_checkpoint",
    "iteration_dirs",
    "load_error",
    "model_arg_changes",
    "preset_changes",
    "preset_directory",
]

# Megatron arguments (attribute names) that define the model's parameters: a checkpoint saved
# with other values cannot be loaded into the model these flags build. Parallel sizes are not
# here (a checkpoint resumes on another layout), nor are flags that change only speed or the
# optimisation (those are checked by Megatron's scheduler and by `check_resume_config`).
MODEL_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "group_query_attention", "num_query_groups", "kv_channels",
    "num_experts", "moe_ffn_hidden_size", "moe_layer_freq",
    "moe_shared_expert_intermediate_size", "moe_router_enable_expert_bias",
    "normalization", "swiglu", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
    "position_embedding_type", "max_position_embeddings",
    "untie_embeddings_and_output_weights",
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
    "qk_pos_emb_head_dim", "v_head_dim", "mtp_num_layers",
    "dirmoe_router", "padded_vocab_size",
)
# What decides the vocabulary (and so the embedding shape) on the command line: part of a
# preset's directory key, next to the model arguments.
PRESET_KEY_ARGS = MODEL_ARGS[:-1] + ("tokenizer_type", "tokenizer_model", "vocab_size",
                                     "make_vocab_size_divisible_by")

_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


# ------------------------------------------------------------------ model arguments
def _normalised(args: Any, name: str) -> Any:
    """An argument as it decides the model (defaults that Megatron resolves made explicit)."""
    value = getattr(args, name, None)
    if name == "num_query_groups" and not getattr(args, "group_query_attention", False):
        return None  # unused without GQA
    if name == "kv_channels" and getattr(args, "num_attention_heads", None) and value in (
            None, args.hidden_size // args.num_attention_heads):
        return None  # Megatron's default, hidden / heads: follows those flags
    if name == "moe_ffn_hidden_size" and value is None:
        return getattr(args, "ffn_hidden_size", None)
    if name == "max_position_embeddings" and getattr(
            args, "position_embedding_type", "learned_absolute") != "learned_absolute":
        return None  # no position table: RoPE / none
    if name == "moe_layer_freq" and value is not None and getattr(args, "num_layers", None):
        from megatron_dirmoe.layout import moe_layer_numbers

        try:
            return tuple(moe_layer_numbers(value, args.num_layers))
        except Exception:  # noqa: BLE001 - an unreadable pattern compares as written
            return value
    if name == "dirmoe_router" and value is None:
        return "dirichlet"
    return value


def model_arg_changes(saved: Any, given: Any) -> list[tuple[str, Any, Any]]:
    """``(name, saved value, given value)`` for every :data:`MODEL_ARGS` entry that differs
    between a checkpoint's saved args and the given ones. An argument the checkpoint does not
    record (an older Megatron) is not compared."""
    changes = []
    for name in MODEL_ARGS:
        if not hasattr(saved, name):
            continue
        old, new = _normalised(saved, name), _normalised(given, name)
        if old != new:
            changes.append((name, getattr(saved, name, None), getattr(given, name, None)))
    return changes


@functools.lru_cache(maxsize=1)
def _parser_actions() -> dict[str, argparse.Action]:
    from megatron_dirmoe.training.arguments import build_parser

    return {action.dest: action for action in build_parser()._actions}


def describe_arg(name: str, value: Any) -> tuple[str, str]:
    """(flag, value as typed) of a Megatron argument, e.g. ``("--hidden-size", "256")``,
    ``("--disable-bias-linear", "set")``."""
    if name == "padded_vocab_size":
        return ("vocabulary size (from --tokenizer-model / --vocab-size, padded to "
                "--make-vocab-size-divisible-by)", str(value))
    action = _parser_actions().get(name)
    if action is None:
        return "--" + name.replace("_", "-"), str(value)
    longs = [o for o in action.option_strings if o.startswith("--")]
    flag = ("--" + name.replace("_", "-")) if "--" + name.replace("_", "-") in longs else longs[0]
    if isinstance(action, argparse._StoreTrueAction):
        return flag, "set" if value else "not set"
    if isinstance(action, argparse._StoreFalseAction):
        return flag, "not set" if value else "set"
    if isinstance(value, (list, tuple)):
        return flag, " ".join(map(str, value))
    return flag, str(value)


# ------------------------------------------------------------------ preset directories
def preset_changes(args: Any, default_of) -> list[tuple[str, Any]]:
    """``(name, value)`` of the :data:`PRESET_KEY_ARGS` whose value in `args` differs from
    ``default_of(name)`` (the preset's) in a way that changes the model."""
    defaults = argparse.Namespace(**{name: default_of(name) for name in PRESET_KEY_ARGS})
    changed = [(name, getattr(args, name)) for name in PRESET_KEY_ARGS
               if hasattr(args, name) and getattr(args, name) != getattr(defaults, name)
               and _normalised(args, name) != _normalised(defaults, name)]
    if any(name == "tokenizer_model" for name, _ in changed):  # the file names the tokenizer
        changed = [(name, value) for name, value in changed if name != "tokenizer_type"]
    return changed


def preset_directory(base: str, changed: Sequence[tuple[str, Any]]) -> str:
    """The default ``--save``/``--load`` of a preset whose model-defining flags were changed:
    ``<base>-<flag>-<value>...`` (e.g. ``runs/dirmoe_tiny-num-experts-6``), so that every model
    shape trained from a preset has its own directory. `changed` is ``(name, value)`` in
    :data:`PRESET_KEY_ARGS` order; the suffix is hashed when it would be long."""
    if not changed:
        return base
    parts = []
    for name, value in changed:
        flag, text = describe_arg(name, value)
        if name in ("tokenizer_model", "vocab_file", "merge_file"):
            text = Path(str(value)).stem
        text = re.sub(r"[^A-Za-z0-9.]+", "_", text.replace("not set", "off")).strip("_")
        parts.append(f"{flag.removeprefix('--')}-{text}" if text != "set" else flag[2:])
    suffix = "-".join(parts)
    if len(suffix) > 80:
        import hashlib

        suffix = "shape_" + hashlib.sha1(suffix.encode()).hexdigest()[:10]
    return f"{base.rstrip('/')}-{suffix}"


# ------------------------------------------------------------------ checkpoint files
@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to resume from: ``iteration`` (None for a ``release`` checkpoint) and its
    directory; ``saved_args`` are the arguments stored in it (None when unreadable by design,
    e.g. the legacy per-rank ``torch`` format)."""

    iteration: Optional[int]
    directory: Path
    saved_args: Optional[argparse.Namespace] = None


def iteration_dirs(root: os.PathLike | str) -> dict[int, Path]:
    """``iteration -> <root>/iter_NNNNNNN`` for every iteration directory under `root`."""
    root = Path(root)
    found = {}
    if root.is_dir():
        for entry in root.iterdir():
            match = _ITER_DIR.match(entry.name)
            if match and entry.is_dir():
                found[int(match.group(1))] = entry
    return found


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "metadata.json").is_file() or (path / ".metadata").is_file() or any(
        path.glob("mp_rank_*"))


def _dcp_problems(directory: Path) -> list[str]:
    """Problems of a torch-distributed checkpoint: its ``.metadata`` and the byte ranges it
    records for every shard file."""
    from torch.distributed.checkpoint import FileSystemReader

    meta_file = directory / ".metadata"
    if not meta_file.is_file():
        return [f"{meta_file} is missing (the index of the shard files)"]
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any failure to read the index is damage
        return [f"{meta_file} cannot be read ({type(exc).__name__}: {exc}); the file is damaged"]
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name in sorted(needed):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing (the metadata records {needed[name]:,} bytes "
                            "in it)")
            continue
        size = path.stat().st_size
        if size < needed[name]:
            problems.append(f"{path} is {size:,} bytes, the metadata records {needed[name]:,} "
                            "(truncated)")
    return problems


def checkpoint_problems(directory: os.PathLike | str) -> list[str]:
    """Why the checkpoint in `directory` cannot be loaded (empty when it looks complete).

    torch_dist / fsdp_dtensor (``metadata.json`` + ``.metadata``): ``metadata.json`` readable,
    every shard file recorded in ``.metadata`` present and at least as long as its recorded
    byte ranges. Legacy ``torch`` format (``mp_rank_*/model_optim_rng.pt``): the files present
    and not empty (the format records no sizes)."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is missing"]
    meta_json = directory / "metadata.json"
    rank_dirs = sorted(directory.glob("mp_rank_*"))
    if not meta_json.is_file() and rank_dirs:  # `--ckpt-format torch`
        problems = []
        for rank_dir in rank_dirs:
            files = list(rank_dir.glob("*.pt"))
            if not files:
                problems.append(f"{rank_dir} holds no .pt file")
            problems += [f"{f} is empty" for f in files if f.stat().st_size == 0]
        return problems
    if not meta_json.is_file():
        return [f"{meta_json} is missing (written with every torch_dist checkpoint)"]
    try:
        backend = json.loads(meta_json.read_text()).get("sharded_backend")
    except (ValueError, OSError, AttributeError) as exc:
        return [f"{meta_json} cannot be read ({exc}); the file is damaged"]
    if backend is None:
        return [f"{meta_json} names no sharded_backend; the file is damaged"]
    return _dcp_problems(directory)


def _newest_intact(root: Path, below: Optional[int]) -> Optional[tuple[int, Path]]:
    """The newest checkpoint under `root` older than iteration `below` with no problems."""
    found = iteration_dirs(root)
    for iteration in sorted(found, reverse=True):
        if (below is None or iteration < below) and not checkpoint_problems(found[iteration]):
            return iteration, found[iteration]
    return None


def _damaged(root: Path, iteration: Optional[int], directory: Path,
             problems: Sequence[str]) -> UserError:
    what = "the latest checkpoint" if iteration is None else f"checkpoint iteration {iteration}"
    text = (f"--load {root}: {what} ({directory}) is damaged:\n    "
            + "\n    ".join(problems))
    earlier = _newest_intact(root, iteration)
    if earlier is not None:
        text += f"\n  the newest intact earlier checkpoint is {earlier[1]} (iteration {earlier[0]})"
        fix = (f"resume from it with --ckpt-step {earlier[0]} (later iterations are trained "
               f"again and saved over the damaged one), or restore {directory} from a copy")
    else:
        fix = (f"restore {directory} from a copy; no intact earlier checkpoint is in {root}, so "
               "otherwise start afresh with another --save/--load directory")
    return UserError(text, fix)


def _read_tracker(root: Path) -> Optional[str]:
    from megatron_dirmoe.training.checkpointing import tracker_file

    tracker = tracker_file(root)
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not (text.isdigit() or text == "release"):
        raise UserError(
            f"--load {root}: {tracker} should hold the last saved iteration (a number, or "
            f"'release'), found {text[:40]!r}",
            "write the iteration of an intact checkpoint into it (e.g. `echo 200 > "
            f"{tracker}`), or choose one with --ckpt-step N",
        )
    return text


def find_checkpoint(load: Optional[str], ckpt_step: Optional[int] = None) -> Optional[ResumePoint]:
    """The checkpoint a run with ``--load load [--ckpt-step N]`` resumes from, checked for
    integrity; None when there is none to resume from (a fresh start). Raises `UserError`
    naming the file and the fix for anything else."""
    from megatron_dirmoe.training.checkpointing import checkpoint_dir, tracker_file

    if load is None:
        if ckpt_step:
            raise UserError(f"--ckpt-step {ckpt_step} without --load", "add --load <directory>")
        return None
    root = Path(load)
    if root.exists() and not root.is_dir():
        raise UserError(f"--load {root} is a file; expected the directory that --save wrote "
                        "(holding latest_checkpointed_iteration.txt and iter_* directories)",
                        "pass that directory")
    if not root.exists():
        if ckpt_step:
            raise UserError(f"--load {root} does not exist (with --ckpt-step {ckpt_step})",
                            "pass the directory that --save wrote")
        return None
    if _is_checkpoint_dir(root):
        match = _ITER_DIR.match(root.name)
        step = f" --ckpt-step {int(match.group(1))}" if match else ""
        raise UserError(
            f"--load {root} is one checkpoint's own directory; --load takes the run directory "
            "that holds latest_checkpointed_iteration.txt and the iter_* directories",
            f"pass --load {root.parent}{step}")

    found = iteration_dirs(root)
    text = _read_tracker(root)
    if ckpt_step:
        if ckpt_step not in found:
            have = ", ".join(map(str, sorted(found))) or "none"
            raise UserError(f"--ckpt-step {ckpt_step}: {root} has no iter_{ckpt_step:07d} "
                            f"(iterations saved there: {have})",
                            "choose one of those iterations, or drop --ckpt-step to resume "
                            "from the latest")
        iteration, release = ckpt_step, False
    elif text is None:
        intact = [it for it in sorted(found) if not checkpoint_problems(found[it])]
        if not intact:
            return None  # nothing saved yet, or only a save cut short: start afresh
        raise UserError(
            f"--load {root} holds checkpoints (iterations {', '.join(map(str, intact))}) but "
            f"no {tracker_file(root).name}, which names the one to resume from (a save cut "
            "short before it was written?)",
            f"resume from the newest with --ckpt-step {intact[-1]}, or start afresh with "
            "another --save/--load directory")
    elif text == "release":
        iteration, release = None, True
    else:
        iteration, release = int(text), False
    directory = root / "release" if release else checkpoint_dir(root, iteration)
    if not directory.is_dir():
        problems = [f"{directory} is missing (named by {tracker_file(root)})"]
        raise _damaged(root, iteration, directory, problems)
    problems = checkpoint_problems(directory)
    if problems:
        raise _damaged(root, iteration, directory, problems)
    return ResumePoint(iteration, directory)


def read_saved_args(point: ResumePoint) -> Optional[argparse.Namespace]:
    """The arguments stored in a torch_dist checkpoint (reads only its common state); None for
    formats that keep them elsewhere. Damage found only now (the bytes are there but do not
    decode) is reported like missing files."""
    if not (point.directory / ".metadata").is_file():
        return None
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_dirmoe.training.checkpointing import _cpu_device_without_cuda

    try:
        with _cpu_device_without_cuda():
            common = dist_checkpointing.load_common_state_dict(str(point.directory))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - reported, by file
        root = point.directory.parent
        detail = " ".join(str(exc).split())[:300]
        raise _damaged(root, point.iteration, point.directory,
                       [f"its saved state does not decode ({type(exc).__name__}: {detail})"]
                       ) from exc
    return common.get("args") if isinstance(common, dict) else None


def _model_mismatch(point: ResumePoint, changes, root) -> UserError:
    lines = []
    for name, old, new in changes:
        flag, old_text = describe_arg(name, old)
        _, new_text = describe_arg(name, new)
        lines.append(f"{flag}: saved {old_text}, given {new_text}")
    where = f"iteration {point.iteration}" if point.iteration is not None else "release"
    return UserError(
        f"--load {root} holds another model ({where}, {point.directory.name}); its "
        "model-defining flags differ from the given ones:\n    " + "\n    ".join(lines),
        "to resume it, give the saved values (or drop those flags); to train this model "
        f"afresh, use another directory: --save DIR --load DIR (or move {root} away)")


def load_error(point: ResumePoint, exc: BaseException) -> UserError:
    """A checkpoint that passed :func:`checkpoint_problems` still failed to load: its bytes do
    not decode, or it holds tensors this model does not have (flags outside :data:`MODEL_ARGS`
    changed). Name it, the newest intact earlier one, and both fixes."""
    root = point.directory.parent
    detail = " ".join(str(exc).split())[:400]
    text = (f"--load {root}: {point.directory} does not load into this model "
            f"({type(exc).__name__}: {detail})")
    earlier = _newest_intact(root, point.iteration)
    fix = ("if it was saved with other model flags, give those; if its files are damaged, "
           + (f"resume from the newest intact earlier checkpoint {earlier[1]} with --ckpt-step "
              f"{earlier[0]}" if earlier else "restore them from a copy"))
    return UserError(text, fix, restated=True)


def check_resume(args: argparse.Namespace) -> Optional[ResumePoint]:
    """Steps 1-4 of the module docstring for ``args`` (after the tokenizer set
    ``args.padded_vocab_size``): the checkpoint to resume from, or None for a fresh start.
    ``--exit-on-missing-checkpoint`` turns "no checkpoint" into an error, as in Megatron."""
    from megatron_dirmoe.training.checkpointing import check_resume_config

    point = find_checkpoint(args.load, getattr(args, "ckpt_step", None))
    if point is None:
        if args.load is not None and getattr(args, "exit_on_missing_checkpoint", False):
            raise UserError(f"--load {args.load}: no checkpoint there "
                            "(--exit-on-missing-checkpoint)",
                            "check the path, or drop --exit-on-missing-checkpoint to start "
                            "afresh")
        return None
    saved = read_saved_args(point)
    if saved is None:
        return point
    changes = model_arg_changes(saved, args)
    if changes:
        raise _model_mismatch(point, changes, Path(args.load))
    if point.iteration is not None:  # a release checkpoint starts a new run: settings may change
        check_resume_config(saved, args, args.load)
    return ResumePoint(point.iteration, point.directory, saved)
