"""The one error type users see: a message and a hint, rendered by the CLI as `Error: …` with exit 1."""

from __future__ import annotations

import math
import re
import stat
from collections.abc import Iterable
from pathlib import Path


class TwoTowerError(Exception):
    """A problem the user can fix. `message` says what is wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun` for a message, plural unless n is 1: "1 tensor", "3 tensors" (`plural`: if not noun + s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def non_finite(what: str, so: str) -> TwoTowerError:
    """The error for model outputs with a NaN or an infinity (`what`: "the model's logits"; `so`: what that
    means for the command), from a NaN weight or an fp16 overflow."""
    return TwoTowerError(f"{what} are NaN or infinite, so {so}",
                         "check the weights with `twotower inspect --values`; fp16 activations can overflow: "
                         "try --dtype bf16 or fp32")


def lone_surrogate_at(text: str) -> int | None:
    """Where `text` holds a lone UTF-16 surrogate, else None: no text, which the tokenizer refuses with a bare
    TypeError. Python reads argv's and stdin's bytes that are not UTF-8 so, and JSON's "\\ud800" escape too."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_whole(name: str, value: object) -> None:
    """A `TwoTowerError` unless `value` is an integer or None (bool is no count: True would be 1)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TwoTowerError(f"{name} is a whole number, not {type(value).__name__} {value!r:.40}",
                            f"e.g. {name}={int(value) if isinstance(value, float) and math.isfinite(value) else 8}")


def check_real(name: str, value: object) -> None:
    """A `TwoTowerError` unless `value` is a number or None (its range is checked where it is used)."""
    if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
        raise TwoTowerError(f"{name} is a number, not {type(value).__name__} {value!r:.40}", f"e.g. {name}=0.8")


def check_seed(seed: int, name: str = "--seed") -> None:
    """Every command takes seeds from 0 to 2**64 - 1: torch's generators take 64-bit seeds (and read a negative
    one as 2**64 plus it: two spellings of one stream), numpy's SeedSequence (train and eval derive their
    seeds with it) takes no negative ones, and one rule for all keeps a seed valid wherever it is copied."""
    if not 0 <= seed < 1 << 64:
        raise TwoTowerError(f"{name} {seed} is out of range", "use a seed from 0 to 2**64 - 1")


def not_a_file(path: Path, what: str, hint: str) -> TwoTowerError:
    """The error for a path given as a `what` ("data file", "prompt file") that names no file to read: what it
    names instead (a checkpoint folder, another folder, a pipe where one will not do, nothing)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return TwoTowerError(f"{path} is a checkpoint folder, not a {what}", hint)
    if path.is_dir():
        found = "is a folder, not a file"
    elif path.exists():
        found = "is a pipe, not a file" if stat.S_ISFIFO(path.stat().st_mode) else "is not a regular file"
    else:
        found = "does not exist"
    return TwoTowerError(f"{what} {path} {found}", hint)


def check_files(paths: Iterable[Path], what: str, hint: str, *, pipes: bool = True) -> None:
    """Each of `paths` names a file to read (or, with `pipes`, anything but a folder: a pipe such as
    `<(zcat corpus.txt.gz)`, read once), else `not_a_file`'s error."""
    for path in map(Path, paths):
        if path.is_dir() or not path.exists() or not (pipes or path.is_file()):
            raise not_a_file(path, what, hint)


OUT_OF_DEVICE_MEMORY_HINT = ("use a smaller --dtype or batch, free the GPU, or put the towers on two GPUs "
                             "where the command allows it (--context-device / --denoiser-device)")


def device_out_of_memory(e: BaseException) -> str | None:
    """For torch's out-of-memory error on a GPU (a RuntimeError, not Python's MemoryError): its first sentences
    ("CUDA out of memory. Tried to allocate 2.00 GiB."), without the allocator's paragraph after them; else
    None. torch is not imported here (the CLI starts without it)."""
    if type(e).__name__ != "OutOfMemoryError" or not isinstance(e, RuntimeError):
        return None
    text = str(e).strip()
    return ". ".join(text.split(". ")[:2]).rstrip(".") or "out of GPU memory"


HOST_MEMORY_HINT = "try a smaller --dtype, fewer tokens or another device"
_CPU_ALLOCATOR = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")


def host_out_of_memory(e: BaseException) -> str | None:
    """For torch's CPU allocator failing (a RuntimeError, "DefaultCPUAllocator: can't allocate memory", not
    Python's MemoryError): "out of host memory: tried to allocate 745.06 GiB"; else None."""
    found = _CPU_ALLOCATOR.search(str(e)) if isinstance(e, RuntimeError) else None
    if found is None:
        return None
    n = float(found.group(1))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            break
        n /= 1024
    return f"out of host memory: tried to allocate {n:,.2f} {unit}"


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` says memory ran out: Python's MemoryError, torch's CPU allocator, or a GPU's."""
    return isinstance(e, MemoryError) or host_out_of_memory(e) is not None or device_out_of_memory(e) is not None


def describe(e: BaseException) -> tuple[str, str | None]:
    """(message, hint) of the `Error:` line for `e`: a TwoTowerError's own; an interrupt; out of memory (host
    or GPU); a system error with its path; anything else as a bug to report."""
    if isinstance(e, TwoTowerError):
        return e.message, e.hint
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", None
    if isinstance(e, MemoryError):
        return "out of memory", HOST_MEMORY_HINT
    if (host := host_out_of_memory(e)) is not None:
        return host, HOST_MEMORY_HINT
    if (oom := device_out_of_memory(e)) is not None:
        return oom, OUT_OF_DEVICE_MEMORY_HINT
    if isinstance(e, PermissionError):  # (the path may not exist: a folder above it that cannot be searched)
        return (f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else ""),
                "check the permissions of that path and of the folders above it")
    if isinstance(e, OSError):
        return (f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else ""),
                "check paths, permissions and free disk space")
    return f"{type(e).__name__}: {e}", "this looks like a bug; rerun with TWOTOWER_DEBUG=1 and report it"
