"""The `gpu`-marked kernel tests on a CPU: mamba-ssm's real Triton kernels run by Triton's interpreter.

With TRITON_INTERPRET=1 Triton executes each @triton.jit kernel in numpy on the host, on CPU tensors, so the
three mamba-ssm kernels twotower uses (chunk scan, one-token state update, gated RMSNorm) can be checked
against the torch ops without a GPU (`python scripts/gpu_kit.py interpret`). Four things stand in the way;
`install()` patches them, in this test process only and only in that mode:

- mamba-ssm's wrappers enter `torch.cuda.device(x.device.index)`, which fails for a CPU index (None): a
  no-op context instead;
- its autotuned kernels time their configs through the GPU driver: the first config only, untimed;
- Triton's interpreter multiplies bf16 `tl.dot` operands as their uint16 storage bits (a 16×16 product came
  out 2.6e10 off with Triton 3.9): they are converted to fp32 first, as the GPU's bf16 MMA computes exactly;
- numpy's fp32 products are exact, but an H100 runs an fp32 `tl.dot` in TF32 (Triton's default
  input_precision): its operands are truncated to TF32's 10-bit mantissa here, so the tests' tolerances face
  the rounding the GPU will apply (truncation is the coarser of the two ways hardware may round).

causal-conv1d is CUDA C++, not Triton: its tests skip (the conv stays in torch). Checked with Triton 3.9.0 and
mamba-ssm 2.3.2.post1; the patches touch Triton internals and may need updating for other versions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import numpy as np
import torch

_installed: list[bool] = []


def active() -> bool:
    """Interpreter mode: TRITON_INTERPRET=1, triton importable, and no CUDA (a GPU runs the real thing)."""
    return (os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
            and importlib.util.find_spec("triton") is not None)


def _tf32(handle, interpreter):
    bits = handle.data.view(np.uint32) & np.uint32(0xFFFFE000)  # keep sign, exponent and 10 mantissa bits
    return interpreter.TensorHandle(bits.view(np.float32), handle.dtype.scalar)


def install() -> None:
    """Apply the patches of the module docstring (once)."""
    if _installed:
        return
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner

    torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
    Autotuner.prune_configs = lambda self, kwargs: [self.configs[0]]
    dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, *rest):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        if (a.dtype.scalar == tl.float32 and b.dtype.scalar == tl.float32
                and "TF32" in str(input_precision).upper() and "X3" not in str(input_precision).upper()):
            a, b = _tf32(a, interpreter), _tf32(b, interpreter)
        return dot(self, a, b, d, input_precision, *rest)

    interpreter.InterpreterBuilder.create_dot = create_dot
    _installed.append(True)
