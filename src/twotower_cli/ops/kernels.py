"""Optional CUDA kernels (mamba-ssm, causal-conv1d) behind exactly the signatures of our torch ops.

    use_kernels(t, family=MAMBA)    run the kernels of a family (MAMBA or CONV) for a tensor t? (per call)
    use_sdpa(t) -> bool             use F.scaled_dot_product_attention in attention? (per call)
    force(kernels=None, sdpa=None)  context manager that overrides both (tests, benchmarks)
    probe() -> Kernels              the imported kernel functions (None fields for a family that did not import)
    available(family), unavailable_reason(family), describe(), summary()   per family: MAMBA (mamba-ssm) or CONV
                                    (causal-conv1d); describe() says why one is missing, summary() is short

    ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=None, *, D=None, dt_bias=None)
        -> (y fp32, final_state fp32)                                                         == ops.ssd
    ssd_step(state, x, dt, A, B, C, *, D=None, dt_bias=None) -> (y fp32, new_state fp32); `state` is not
        modified                                                                              == ops.ssd
    causal_conv(xBC [b,L,c], conv_state [b,c,K] | None, weight [c,1,K], bias [c] | None, keep_state=True)
        -> (silu(conv) [b,L,c], new conv_state = last K raw columns | None)                   == Mamba2Mixer.conv
    gated_rmsnorm(y, z, weight, n_groups, eps) -> [..., d] in z's dtype                       == GatedGroupRMSNorm

Selection (design principle 7): `TWOTOWER_KERNELS=torch|cuda|auto` (default auto). auto: the kernels when
they import and the tensor is on CUDA; torch: the plain-torch reference everywhere (also the explicit
attention math instead of SDPA); cuda: the kernels or a TwoTowerError. `force(...)` beats the variable.
The two libraries are probed separately: with mamba-ssm alone (causal-conv1d is the harder one to build)
the scan, step and norm run its kernels and the conv stays in torch. mamba-ssm installed without its CUDA
extension (MAMBA_SKIP_CUDA_BUILD=TRUE) works too: the three kernels used here are Triton (`_import_mamba`).

Nothing here imports mamba_ssm or causal_conv1d at package import time: without their compiled
extensions they raise on import (ImportError, OSError for a missing .so, RuntimeError from triton…).
`probe()` imports them on first use inside a try that catches any exception, and caches the answer.

Kernel conventions, checked against the public sources (state-spaces/mamba, Dao-AILab/causal-conv1d):
- `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x [b,L,h,p], dt [b,L,h], A [h], B [b,L,g,n],
  C [b,L,g,n], chunk_size, D=None, z=None, dt_bias=None, initial_states [b,h,p,n]=None, seq_idx=None,
  dt_softplus=False, dt_limit=(0, inf), return_final_states=False)` -> out [b,L,h,p] in x's dtype (and
  final_states [b,h,p,n] fp32). Given `dt_bias` (ops.ssd's contract: dt is raw), we pass it with
  dt_softplus=True and `D` too, so that the kernels compute softplus(dt + dt_bias) and add D·x themselves,
  as transformers' CUDA path for NemotronH does (mamba-ssm's Triton softplus is log(exp(dt) + 1), torch's
  log1p(exp(dt)): they differ by fp32 rounding). The mixer always passes D, and dt_bias when there is no
  dt clamp and no pad (spec §9: a clamp is the mixer's, and then dt comes softplus'ed and clamped). The
  states *entering each chunk* are kept in C's dtype (`_state_passing_fwd(..., out_dtype=C.dtype)`), so a
  seeded block with bf16 C would round the context state to bf16 before using it: with an initial state
  we therefore pass x, B, C in fp32 (spec §9: scan seeded blocks in fp32). Without one (a fresh prefill)
  the inputs keep their dtype, as transformers' NemotronH does; accumulation is fp32 either way.
  transformers' modeling_nemotron_h (5.x) passes `initial_states=recurrent_state` for every chunked call;
  the failure seen in the field was callers that dropped the state (or took the one-token path) for
  seeded blocks shorter than chunk_size. We pass it for every L and check short seeded blocks once per
  device against the torch scan (`_short_seeded_ok`); a kernel build that disagrees is not used for them.
- `mamba_ssm.ops.triton.selective_state_update.selective_state_update(state [b,h,p,n], x [b,h,p],
  dt [b,h,p], A [h,p,n], B [b,g,n], C [b,g,n], D=None, z=None, dt_bias=None, dt_softplus=False)` updates
  `state` IN PLACE and returns out [b,h,p] in x's dtype. Per-head dt/A are passed as stride-0 expands
  (`dt[..., None].expand(b,h,p)`, `A[:, None, None].expand(h,p,n)`), as transformers does; the kernel's
  `tie_hdim` fast path then reads `dt_bias.stride(-1)`, and the launch unpacks `*(D.stride(0), D.stride(1))
  if D is not None else 0`, a TypeError for D=None (mamba-ssm 2.3.2): both fail on None, so without
  `dt_bias` / `D` we pass zeros for them, expanded the same way. B and C go in as they are (the kernel reads
  them as fp32, an exact conversion); x is made fp32 so that y comes out fp32. We clone the state first (our
  ssd_step never mutates its input).
- `causal_conv1d.causal_conv1d_fn(x [b,c,L], weight [c,K], bias, seq_idx=None, initial_states [b,c,K-1]=None,
  return_final_states=False, activation="silu")`: initial_states only in channel-last layout (x.stride(1)
  == 1, initial_states.stride(1) == 1; csrc/causal_conv1d.cpp checks c % 8 == 0 and x.stride(0), x.stride(2)
  multiples of 8). `causal_conv1d_update(x [b,c], conv_state [b,c,K], weight, bias, activation)` shifts
  conv_state IN PLACE (older builds require state_len == K exactly, newer >= K-1; we keep K): without
  cache_seqlens it becomes the last state_len columns of [conv_state ‖ x] (causal_conv1d_update_ref), which
  for state_len == K is our new state. So a decode step clones the state, lets the kernel shift it, and
  returns the clone: one copy, where building the new state beside it took two more. For the model's own
  cache (`Mamba2Mixer(in_place=True)`, a one-token step of `NemotronHModel` with a cache) neither state is
  copied at all: both kernels update the cache's tensors, which nobody else holds (snapshots are clones).
- `mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn(x, weight, bias, z=None, eps, group_size,
  norm_before_gate)`: with norm_before_gate=False it computes norm(x * silu(z)) per group of group_size,
  in fp32, output in x's dtype; we cast to z's dtype as GatedGroupRMSNorm does. It reshapes x and z to rows
  itself and copies only a last dimension that is not contiguous, so z goes in as the in_proj slice it is.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from twotower_cli.errors import TwoTowerError

ENV = "TWOTOWER_KERNELS"
MODES = ("auto", "torch", "cuda")

# What `force` set: a plain module dict, not ContextVars, because the selection runs inside torch.compile'd
# steps (--compile): dynamo reads a global dict and guards on its values, while ContextVar.get is a graph break
# that made it skip the whole layer loop. Process-wide, like TWOTOWER_KERNELS (read once into a compiled graph).
_forced: dict[str, str | bool | None] = {"kernels": None, "sdpa": None}


@dataclass(frozen=True)
class Kernels:
    """The kernel functions that imported; a family that did not import has None in its fields."""
    chunk_scan: Callable | None = None  # mamba_ssm: mamba_chunk_scan_combined
    state_update: Callable | None = None  # mamba_ssm: selective_state_update
    rmsnorm: Callable | None = None  # mamba_ssm: layernorm_gated.rmsnorm_fn
    conv_fn: Callable | None = None  # causal_conv1d: causal_conv1d_fn
    conv_update: Callable | None = None  # causal_conv1d: causal_conv1d_update
    mamba_note: str = ""  # how mamba_ssm was imported ("triton kernels only" when its package __init__ failed)


MAMBA, CONV = "mamba-ssm", "causal-conv1d"  # the two kernel families: the scan/step/norm ops and the conv ops
FAMILIES = (MAMBA, CONV)
_MAMBA_MODULES = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update",
                  "mamba_ssm.ops.triton.layernorm_gated")

_probe_result: list = []  # [Kernels, {family: reason it did not import}]: filled once by probe()
_short_ok: dict[str, bool] = {}  # device → kernel scan agrees with torch on short seeded blocks


def _import_mamba() -> dict:
    """mamba_ssm's three Triton kernels. They need triton, not mamba_ssm's compiled selective-scan extension,
    but `mamba_ssm/__init__.py` imports that extension (`selective_scan_cuda`) unconditionally, so a mamba-ssm
    installed with MAMBA_SKIP_CUDA_BUILD=TRUE (minutes faster to install; no CUDA compiler needed) or built for
    another torch raises on any `import mamba_ssm...`. In that case the package is registered without running
    its __init__ and the three submodules are imported from it: `mamba_ssm` then lacks its top-level names
    (Mamba, selective_scan_fn, ...), which could not be imported in this environment anyway."""
    import importlib
    import importlib.util
    import sys

    def load() -> dict:
        ssd, ssu, norm = (importlib.import_module(m) for m in _MAMBA_MODULES)
        return dict(chunk_scan=ssd.mamba_chunk_scan_combined, state_update=ssu.selective_state_update,
                    rmsnorm=norm.rmsnorm_fn)

    try:
        return load()
    except Exception as first:  # noqa: BLE001 - see the docstring
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or not spec.submodule_search_locations:
            raise
        sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
        try:
            kernels = load()
        except Exception:  # the Triton modules fail too (no triton, say): that is the reason to report
            del sys.modules["mamba_ssm"]
            raise
        return dict(kernels, mamba_note=f"triton kernels only ({type(first).__name__}: {first})")


def _import_conv() -> dict:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update

    return dict(conv_fn=causal_conv1d_fn, conv_update=causal_conv1d_update)


def probe() -> Kernels:
    """The kernel functions of each family that imports (None fields for one that does not). Imported once,
    then cached; `unavailable_reason(family)` says why a family is missing."""
    if not _probe_result:
        found: dict = {}
        reasons: dict[str, str] = {}
        for family, importer in ((MAMBA, _import_mamba), (CONV, _import_conv)):
            try:
                found.update(importer())
            except BaseException as e:  # noqa: BLE001 - a broken extension can raise anything on import
                if isinstance(e, KeyboardInterrupt):
                    raise
                reasons[family] = f"{type(e).__name__}: {e}"
        _probe_result[:] = [Kernels(**found), reasons]
    return _probe_result[0]


def available(family: str = MAMBA) -> bool:
    """Whether `family` (MAMBA or CONV) imported."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    probe()
    return family not in _probe_result[1]


def unavailable_reason(family: str = MAMBA) -> str:
    """Why `family` did not import ("" when it did)."""
    probe()
    return _probe_result[1].get(family, "")


def describe() -> str:
    """One line for reports: which kernel families imported, and why not (or that TWOTOWER_KERNELS=torch)."""
    if mode() == "torch":
        return summary()
    k = probe()
    parts = []
    for family in FAMILIES:
        if available(family):
            note = f" ({k.mamba_note.split(' (')[0]})" if family == MAMBA and k.mamba_note else ""
            parts.append(f"{family} yes{note}")
        else:
            parts.append(f"{family} no ({unavailable_reason(family)})")
    return " · ".join(parts)


def summary() -> str:
    """A few words for stats lines: which kernels the ops on CUDA tensors use."""
    if mode() == "torch":
        return f"torch ({ENV}=torch)"
    have = [f for f in FAMILIES if available(f)]
    return " + ".join(have) if have else "none (plain torch)"


def _reset_probe() -> None:
    """Forget the cached probe (tests)."""
    _probe_result.clear()
    _short_ok.clear()
    _failed.clear()


def mode() -> str:
    forced = _forced["kernels"]
    if forced is not None:
        return forced
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise TwoTowerError(f"{ENV}={value!r} is not one of {', '.join(MODES)}",
                            "use torch (plain PyTorch), cuda (require the kernels) or auto")
    return value


def use_kernels(t: Tensor, family: str = MAMBA) -> bool:
    """Whether an op of `family` (MAMBA: scan, one-token step, gated norm; CONV: the causal conv) on tensor `t`
    runs its CUDA kernel (see the module docstring)."""
    m = mode()
    if m == "torch":
        return False
    if m == "cuda":
        if not t.is_cuda:
            raise TwoTowerError(f"{ENV}=cuda but a tensor is on {t.device}",
                                f"the kernels need the model on a GPU (--device cuda), or unset {ENV}")
        if not available(family):
            missing = [f for f in FAMILIES if not available(f)]
            why = "; ".join(f"{f}: {unavailable_reason(f)}" for f in missing)
            raise TwoTowerError(f"{ENV}=cuda but the {' and '.join(missing)} kernels do not import ({why})",
                                "install them for this torch and CUDA (README: GPU hosts), or unset "
                                f"{ENV} to run what is missing in torch")
        return True
    return t.is_cuda and available(family)


def use_sdpa(t: Tensor) -> bool:
    """Whether attention uses F.scaled_dot_product_attention (CUDA, unless TWOTOWER_KERNELS=torch)."""
    forced = _forced["sdpa"]
    if forced is not None:
        return forced
    return t.is_cuda and mode() != "torch"


@contextlib.contextmanager
def force(kernels: str | None = None, sdpa: bool | None = None) -> Iterator[None]:
    """Override the selection inside the block: kernels="torch"|"cuda"|"auto", sdpa=True|False (None: leave
    as it is, so blocks nest)."""
    if kernels is not None and kernels not in MODES:
        raise ValueError(f"kernels must be one of {MODES}")
    before = dict(_forced)
    _forced.update({k: v for k, v in (("kernels", kernels), ("sdpa", sdpa)) if v is not None})
    try:
        yield
    finally:
        _forced.update(before)


# ---------------------------------------------------------------------------------------------- wrappers

_failed: dict[str, str] = {}  # op name → why its kernel was given up (auto mode)
_EAGER: list[str] = []  # the wrappers below, by name, which torch.compile must not trace


def _eager(fn: Callable) -> Callable:
    """Mark a wrapper to run outside torch.compile graphs (mamba-ssm's Triton and CUDA calls are not
    traceable). `torch.compiler.disable` itself is applied by `prepare_compile`, only when something is
    compiled: it imports torch._dynamo, about 1 s of start-up that every command would pay otherwise.
    Callers reach the wrappers as `kernels.<name>` attributes, so they pick up the replaced functions."""
    _EAGER.append(fn.__name__)
    return fn


def prepare_compile() -> None:
    """Keep the kernel wrappers out of torch.compile graphs; call before compiling anything that uses them.
    Also probes the kernels now, so that the imports never happen inside a trace (after the probe,
    `use_kernels` only reads cached dicts, which dynamo turns into guards)."""
    probe()
    module = globals()
    for name in _EAGER:
        if not getattr(module[name], "_torchdynamo_disable", False):
            module[name] = torch.compiler.disable(module[name])


@_eager
def call(name: str, kernel_fn: Callable, torch_fn: Callable, *args, **kwargs):
    """`kernel_fn(*args, **kwargs)`. In auto mode a kernel that raises (a shape its build does not support, e.g.
    the tiny test model's 8-wide state, or a broken install) is reported once with a warning and `torch_fn`
    (same signature) is used for that op from then on; with TWOTOWER_KERNELS=cuda the error propagates."""
    if name in _failed:
        return torch_fn(*args, **kwargs)
    try:
        return kernel_fn(*args, **kwargs)
    except TwoTowerError:
        raise
    except Exception as e:  # noqa: BLE001 - any kernel failure: fall back, loudly
        if mode() == "cuda":
            raise
        _failed[name] = f"{type(e).__name__}: {e}"
        warnings.warn(f"{name} kernel failed ({_failed[name]}); using the torch implementation from now on",
                      stacklevel=2)
        return torch_fn(*args, **kwargs)


def _kernels(family: str = MAMBA) -> Kernels:
    if not available(family):
        raise TwoTowerError(f"the {family} CUDA kernels are not available ({unavailable_reason(family)})",
                            f"set {ENV}=torch or install {family}")
    return probe()


@_eager
def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                initial_state: Tensor | None = None, *, D: Tensor | None = None,
                dt_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ops.ssd.ssd_chunked on mamba_chunk_scan_combined. Outputs fp32; `initial_state` is only read."""
    L = x.shape[1]
    if L == 0 or (initial_state is not None and L < chunk_size and not _short_seeded_ok(x.device)):
        from twotower_cli.ops.ssd import ssd_chunked as torch_ssd_chunked

        return torch_ssd_chunked(x, dt, A, B, C, chunk_size, initial_state, D=D, dt_bias=dt_bias)
    return _kernel_scan(x, dt, A, B, C, chunk_size, initial_state, D, dt_bias)


def _kernel_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                 initial_state: Tensor | None, D: Tensor | None = None,
                 dt_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    k = _kernels()
    init = None
    if initial_state is not None:
        # fp32 inputs: the kernel keeps chunk-entering states in C's dtype (see the module docstring)
        x, B, C = x.float(), B.float(), C.float()
        init = initial_state.float().contiguous()
    fused = {} if dt_bias is None else dict(dt_bias=dt_bias.float(), dt_softplus=True)
    y, final = k.chunk_scan(x.contiguous(), dt.contiguous() if fused else dt.float().contiguous(),
                            A.float().contiguous(), B.contiguous(), C.contiguous(), chunk_size,
                            D=None if D is None else D.float(), initial_states=init, return_final_states=True,
                            **fused)
    return y.float(), final.float()


def _short_seeded_ok(device: torch.device) -> bool:
    """Once per device: does the kernel scan of a seeded block shorter than chunk_size match the torch scan?"""
    key = str(device)
    if key not in _short_ok:
        from twotower_cli.ops.ssd import ssd_chunked as torch_ssd_chunked

        g = torch.Generator(device="cpu").manual_seed(0)
        b, h, p, gr, n, chunk = 2, 4, 64, 2, 64, 128
        args = [torch.randn(b, 5, h, p, generator=g), torch.rand(b, 5, h, generator=g) * 0.2,
                -torch.rand(h, generator=g) * 4 - 0.5, torch.randn(b, 5, gr, n, generator=g),
                torch.randn(b, 5, gr, n, generator=g)]
        init = torch.randn(b, h, p, n, generator=g)
        args = [a.to(device) for a in args]
        try:
            y, s = _kernel_scan(*args, chunk, init.to(device))
            y_ref, s_ref = torch_ssd_chunked(*args, chunk, init.to(device))
            err = max((y - y_ref).abs().max().item(), (s - s_ref).abs().max().item())
            ok = err <= 1e-2 * (1 + y_ref.abs().max().item())
            why = f"max |diff| {err:.3g}"
        except Exception as e:  # noqa: BLE001 - any kernel failure means: do not use it for this case
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            warnings.warn(f"mamba_chunk_scan_combined disagrees with the torch scan on a seeded block shorter "
                          f"than chunk_size ({why}); such blocks use the torch scan on {device}", stacklevel=2)
        _short_ok[key] = ok
    return _short_ok[key]


@_eager
def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
             dt_bias: Tensor | None = None, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """ops.ssd.ssd_step on selective_state_update; returns a new state, `state` is left untouched, unless
    `in_place` (a cache's own fp32 contiguous state): then the kernel updates it and it is returned."""
    k = _kernels()
    b, h, p = x.shape
    n = state.shape[-1]
    if in_place and state.dtype == torch.float32 and state.is_contiguous():
        new_state = state
    else:
        new_state = state.to(torch.float32, copy=True)  # the kernel writes in place
    zeros = None
    if D is None or dt_bias is None:
        zeros = torch.zeros(h, device=x.device, dtype=torch.float32)

    def per_dim(t: Tensor | None) -> Tensor:  # [h] → [h, p], stride 0 along p (the kernel's tie_hdim path)
        return (zeros if t is None else t.float())[:, None].expand(h, p)

    y = k.state_update(new_state, x.float().contiguous(), dt[..., None].expand(b, h, p),
                       A.float()[:, None, None].expand(h, p, n), B, C, D=per_dim(D), z=None,
                       dt_bias=per_dim(dt_bias), dt_softplus=dt_bias is not None)
    return y.float(), new_state


@_eager
def ssd_step_in_place(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                      D: Tensor | None = None, dt_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`ssd_step(..., in_place=True)`, as a function of the torch op's signature (for `call`)."""
    return ssd_step(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, in_place=True)


@_eager
def causal_conv(xBC: Tensor, conv_state: Tensor | None, weight: Tensor, bias: Tensor | None,
                keep_state: bool = True, in_place: bool = False) -> tuple[Tensor, Tensor | None]:
    """Mamba2Mixer.conv on causal_conv1d: xBC [b, L, c] raw, conv_state [b, c, K] (None = zeros) → (silu(conv)
    [b, L, c], the last K raw columns [b, c, K], or None for L > 1 without `keep_state`). `conv_state` is only
    read, unless `in_place` and L == 1 (a cache's own contiguous state in xBC's dtype): then the kernel shifts
    it and it is returned."""
    k = _kernels(CONV)
    b, L, c = xBC.shape
    K = weight.shape[-1]
    w = weight.reshape(c, K)
    bias = None if bias is None else bias.to(w.dtype)
    if conv_state is None:
        conv_state = xBC.new_zeros(b, c, K)
    own = in_place and conv_state.dtype == xBC.dtype and conv_state.is_contiguous()
    conv_state = conv_state.to(xBC.dtype)
    if L == 1:  # the kernel shifts the state (a clone, or the cache's own) in place: the new state
        state = conv_state if own else conv_state.clone(memory_format=torch.contiguous_format)
        out = k.conv_update(xBC[:, 0].contiguous(), state, w, bias, "silu")
        return out[:, None], state
    x_cl = xBC.contiguous().transpose(1, 2)  # [b, c, L] channel-last: stride(1) == 1
    if x_cl.stride(2) % 8 or x_cl.stride(0) % 8 or c % 8:
        raise ValueError(f"causal_conv1d's channel-last layout needs channels divisible by 8, got {c}")
    init = conv_state[..., 1:].transpose(1, 2).contiguous().transpose(1, 2)  # [b, c, K-1], stride(1) == 1
    out = k.conv_fn(x_cl, w, bias, initial_states=init, activation="silu")
    if not keep_state:
        return out.transpose(1, 2), None
    return out.transpose(1, 2), torch.cat([conv_state, xBC.transpose(1, 2)], dim=-1)[..., -K:].contiguous()


@_eager
def gated_rmsnorm(y: Tensor, z: Tensor, weight: Tensor, n_groups: int, eps: float) -> Tensor:
    """GatedGroupRMSNorm on layernorm_gated.rmsnorm_fn: norm(y * silu(z)) per group, times weight, in z's dtype."""
    k = _kernels()
    d = y.shape[-1]
    out = k.rmsnorm(y, weight, None, z=z, eps=eps, group_size=d // n_groups, norm_before_gate=False)
    return out.to(z.dtype)


# ---------------------------------------------------------------------------------------------- CPU fast path

SMALL_CONV_L = 16  # up to this many new columns the explicit window sum beats F.conv1d on CPU (benchmarks/README)


def conv_window(window: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise causal conv over window [b, c, K-1+L] (no activation) as K shifted multiply-adds:
    out[..., t] = bias + Σ_k w[:, k] * window[..., t+k]. Equal to F.conv1d(window, weight [c,1,K], bias,
    groups=c) up to summation order; cheaper for small L on CPU (no conv1d dispatch/im2col)."""
    K = weight.shape[-1]
    L = window.shape[-1] - K + 1
    w = weight[:, 0]  # [c, K]
    out = (window[..., 0:L] * w[:, 0:1]) if bias is None else torch.addcmul(bias[:, None], window[..., 0:L], w[:, 0:1])
    for j in range(1, K):
        out = out.addcmul_(window[..., j:j + L], w[:, j:j + 1])
    return out


def small_conv_ok(window: Tensor, kernel: int) -> bool:
    """Use `conv_window` for this window? CPU, fp32 (other dtypes keep F.conv1d's accumulation), small L."""
    return not window.is_cuda and window.dtype == torch.float32 and window.shape[-1] - kernel + 1 <= SMALL_CONV_L


