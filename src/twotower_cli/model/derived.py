"""Tensors computed from a module's own parameter or buffer and kept between inference calls (a router's fp64
weight, a Mamba layer's A = -exp(A_log)): each is a kernel launch per layer and step otherwise.

    derived(module, name, source, make) -> make(source), from the module's store while `source` is unchanged

Only for inference: with autograd on (training, where the result must carry the gradient), under
torch.compile (which traces `make` into its graph instead) or for an inference-mode tensor (no version
counter), `make(source)` runs every call. The store keeps the source's storage alive, so no other tensor can
take its address, and the version counter it had, which in-place updates advance (an optimizer step, a
balancing step of a router bias, a `copy_`); a new tensor in its place (`load_state_dict(assign=True)`, a
`.data` swap, `.to()`) has another storage. Any of these makes the next call compute anew.

`no_reuse()` turns the store off for what runs inside it: FSDP gathers a sharded parameter into the same
storage at every forward without advancing its version counter, so under FSDP an unchanged storage and
version do not mean an unchanged value (`twotower train --fsdp` evaluates inside it).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

_REUSE = contextvars.ContextVar("twotower_derived_reuse", default=True)


@contextlib.contextmanager
def no_reuse() -> Iterator[None]:
    """Inside: `derived` computes every time (module docstring)."""
    token = _REUSE.set(False)
    try:
        yield
    finally:
        _REUSE.reset(token)


def derived(module: nn.Module, name: str, source: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
    """`make(source)`, reused for inference while `source` is the same tensor, unchanged (module docstring)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or source.is_inference() or not _REUSE.get():
        return make(source)
    store: dict[str, tuple[Tensor, int, Tensor]] = module.__dict__.setdefault("_derived", {})
    hit = store.get(name)
    if (hit is not None and hit[0].data_ptr() == source.data_ptr() and hit[0].device == source.device
            and hit[0].shape == source.shape and hit[0].stride() == source.stride() and hit[1] == source._version):
        return hit[2]
    held = source.detach()
    value = make(held)
    store[name] = (held, source._version, value)
    return value
