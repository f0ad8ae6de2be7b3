"""The one error type users see: a message and a hint, rendered by the CLI as `Error: …` with exit 1."""

from __future__ import annotations


class TwoTowerError(Exception):
    """A problem the user can fix. `message` says what is wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


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
