"""User errors of the training entry point: one message that names the flag or file, what was
expected and the fix; no traceback.

What ``dirmoe-pretrain`` shows as a user error (exit status 2, one message on stderr):

1. :class:`UserError` and its subclasses (`megatron_dirmoe.layout.LayoutError`): raised by the
   project's start-up checks of flags, data, tokenizer and checkpoint files;
2. a ``ValueError`` raised by ``megatron_dirmoe``'s own code whose message names a flag
   (``--name``): the project's convention for a bad flag value (DESIGN/STYLE: "ValueError, not
   assert, naming the flag"), so checks written as plain ``ValueError`` read the same;
3. ``SystemExit`` with a message (``raise SystemExit("...")``) and argparse errors (the parser of
   :mod:`megatron_dirmoe.training.arguments` prints them in the same form, also status 2).

Errors that Megatron raises for user input are caught where the project calls it (argument
validation, tokenizer, datasets, checkpoint loading) and restated as :class:`UserError` naming the
flags (:func:`restate`, :func:`restate_megatron_check`). Everything else is a bug and keeps its
traceback. ``DIRMOE_DEBUG=1`` shows the traceback of user errors too.

Pure Python: no torch, no Megatron.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

__all__ = [
    "DEBUG_ENV",
    "UserError",
    "as_user_error",
    "format_user_error",
    "program_name",
    "restate",
    "restate_megatron_check",
    "run_console",
]

DEBUG_ENV = "DIRMOE_DEBUG"
_PACKAGE_DIR = Path(__file__).resolve().parent
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


class UserError(ValueError):
    """Bad flags or input files: `message` names the flag or file and what was expected, `fix`
    says what to do. A ``ValueError`` so that callers of the library API can catch it as one."""

    def __init__(self, message: str, fix: Optional[str] = None, *, restated: bool = False):
        self.message = message
        self.fix = fix
        # The text came from a third-party error (Megatron): DIRMOE_DEBUG=1 shows where.
        self.restated = restated
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def program_name(default: str = "dirmoe-pretrain") -> str:
    """``dirmoe-pretrain`` for the console script, else ``python -m megatron_dirmoe.pretrain``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if name.startswith("dirmoe-"):
        return name
    return default if name != "pretrain.py" else "python -m megatron_dirmoe.pretrain"


def _raised_in_package(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc`'s traceback is megatron_dirmoe's own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    try:
        return Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)
    except OSError:
        return False


def as_user_error(exc: BaseException) -> Optional[UserError]:
    """`exc` as a :class:`UserError` when it is one by the rules of this module, else None."""
    if isinstance(exc, UserError):
        return exc
    if type(exc) is ValueError and _FLAG.search(str(exc)) and _raised_in_package(exc):
        return UserError(str(exc))
    if isinstance(exc, SystemExit) and isinstance(exc.code, str):
        text = exc.code
        for prefix in (program_name() + ":", "dirmoe-pretrain:"):
            text = text.removeprefix(prefix).lstrip()
        return UserError(text)
    return None


def format_user_error(exc: UserError, prog: Optional[str] = None) -> str:
    prog = prog or program_name()
    text = f"{prog}: error: {exc}"
    if exc.restated:
        text += f"\n  ({DEBUG_ENV}=1 shows where it was raised)"
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:  # under torchrun/srun every rank reports: say which one this is
        text = "\n".join(f"[rank {os.environ.get('RANK', '?')}] {line}"
                         for line in text.splitlines())
    return text


def run_console(main: Callable[[Sequence[str]], object], argv: Sequence[str],
                prog: Optional[str] = None) -> int:
    """Run a console entry's `main` with the user-error path: exit status 0 on success, 2 with
    one message for a user error (traceback only with ``DIRMOE_DEBUG=1``); any other exception
    propagates with its traceback."""
    try:
        main(list(argv))
    except BaseException as exc:  # noqa: BLE001 - re-raised unless it is a user error
        user = as_user_error(exc)
        if user is None or debug_requested():
            raise
        sys.stdout.flush()
        print(format_user_error(user, prog), file=sys.stderr, flush=True)
        _release_half_built(exc)
        return 2
    return 0


def _release_half_built(exc: BaseException) -> None:
    """Objects that a failed start-up left half built (e.g. Megatron's `IndexedDataset`, whose
    ``__del__`` assumes a complete ``__init__``) are kept alive by the tracebacks; collect them
    now, with the interpreter's "Exception ignored in __del__" reports off, so that none of
    their tracebacks follows the message."""
    import gc

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
    saved, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = saved


# ------------------------------------------------------------------ Megatron's errors, restated
@contextlib.contextmanager
def restate(what: str, fix: str, catch: tuple = (Exception,),
            raised_in: Optional[Callable[[BaseException], bool]] = None) -> Iterator[None]:
    """Turn an exception of type `catch` raised inside the block (by Megatron for input the
    user gave) into a :class:`UserError`: "`what`: <type>: <message>", with `fix`.
    `raised_in`, when given, must accept the exception (e.g. only errors from Megatron's
    tokenizer code), otherwise it propagates as a bug."""
    try:
        yield
    except UserError:
        raise
    except catch as exc:
        if raised_in is not None and not raised_in(exc):
            raise
        detail = str(exc).strip() or "(no message)"
        raise UserError(f"{what}: {type(exc).__name__}: {detail}", fix, restated=True) from exc


def raised_under(*path_parts: str) -> Callable[[BaseException], bool]:
    """A `raised_in` test: some frame of the traceback is in a file whose path contains one of
    `path_parts` (e.g. ``"/megatron/core/tokenizers/"``)."""
    def test(exc: BaseException) -> bool:
        return any(part in frame.filename.replace(os.sep, "/")
                   for frame in traceback.extract_tb(exc.__traceback__) for part in path_parts)
    return test


def _flags_in(text: str, flag_of: dict[str, str]) -> list[str]:
    """Flags a Megatron message or source line refers to: ``args.<dest>``, ``--flag`` or a
    bare ``snake_case`` argument name."""
    found: list[str] = []
    for dest in re.findall(r"args\.(\w+)", text) + re.findall(r"\b([a-z]+(?:_[a-z0-9]+)+)\b", text):
        flag = flag_of.get(dest)
        if flag and flag not in found:
            found.append(flag)
    for flag in _FLAG.findall(text):
        if flag in flag_of.values() and flag not in found:
            found.append(flag)
    return found


def restate_megatron_check(exc: BaseException, args, flag_of: dict[str, str],
                           checker: str) -> UserError:
    """A :class:`UserError` for an ``AssertionError``/``ValueError`` of Megatron's argument
    validation (`checker`): the flags it concerns with their values, the failed condition
    (Megatron's asserts often have no message: the source line is the message)."""
    frames = traceback.extract_tb(exc.__traceback__)
    frame = next((f for f in reversed(frames) if "/megatron/" in f.filename.replace(os.sep, "/")),
                 frames[-1] if frames else None)
    condition = (frame.line or "").strip() if frame is not None else ""
    message = str(exc).strip()
    flags = _flags_in(f"{condition} {message}", flag_of)
    dest_of = {flag: dest for dest, flag in flag_of.items()}
    given = ", ".join(f"{flag} {getattr(args, dest_of[flag], None)}" for flag in flags)
    condition = condition.removeprefix("assert ").rstrip("\\ ,")
    required = re.fullmatch(r"args\.(\w+) is not None", condition)
    if not message and required and required.group(1) in flag_of:
        flag = flag_of[required.group(1)]
        return UserError(f"{flag} is required with these flags (Megatron's argument check, "
                         f"{checker}: `{condition}`)", f"add {flag} <value>", restated=True)
    text = f"Megatron's argument check ({checker}) rejects "
    text += (given if given else "the arguments")
    if message:
        text += f": {message}"
    elif condition:  # a bare assert: its condition is the message
        text += f": `{condition}` does not hold"
    fix = ("change " + (" / ".join(flags) if flags else "the flags") + " so that the check holds "
           "(dirmoe-pretrain --help describes every flag)")
    return UserError(text, fix, restated=True)


def flag_table(actions: Iterable) -> dict[str, str]:
    """``dest -> --long-flag`` for an argparse parser's actions (the first ``--`` option)."""
    table: dict[str, str] = {}
    for action in actions:
        long_opts = [o for o in getattr(action, "option_strings", ()) if o.startswith("--")]
        if long_opts and action.dest not in table and action.dest != "help":
            # Prefer the spelling that matches the destination (e.g. not a --no-* alias).
            spelled = "--" + action.dest.replace("_", "-")
            table[action.dest] = spelled if spelled in long_opts else long_opts[0]
    return table
