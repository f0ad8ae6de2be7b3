"""Mamba-2 state-space scan (SSD) in plain PyTorch: chunked prefill, one-step decode, sequential reference.

The recurrence, per head (spec §2, step 5), with `dt` already softplus'ed and clamped and `A` negative:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t        h: [head_dim, state]
    y_t = h_t · C_t  (+ D * x_t when D is given)

`dt_bias` given, `dt` is the raw projection and the op applies softplus(dt + dt_bias) first (no clamp), as
mamba-ssm's kernels do with `dt_softplus=True`; `D` given, y includes the D skip. Passing both lets the
kernels (`ops.kernels`) do that work inside the scan instead of in separate launches.

Shapes: b batch, L length, h heads, p head_dim, g groups, n state; head hh reads group hh // (h // g).

    ssd_chunked(x[b,L,h,p], dt[b,L,h], A[h], B[b,L,g,n], C[b,L,g,n], chunk_size, initial_state[b,h,p,n] | None,
                *, D[h] | None, dt_bias[h] | None) -> y[b,L,h,p], final_state[b,h,p,n]
    ssd_sequential(...)   same contract, one time step at a time (the reference the tests compare against)
    ssd_step(state[b,h,p,n], x[b,h,p], dt[b,h], A[h], B[b,g,n], C[b,g,n], *, D, dt_bias) -> y[b,h,p], new_state

All math is fp32 whatever the input dtype; outputs and states are fp32 (the caller casts). Nothing is
modified in place: the initial state passed in is never written to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# exp() of fp32 arguments below about -87.3 (results that are subnormal or 0) takes a slow path on CPU
# (10-40x slower per element, measured with torch 2.13 on AVX-512), and across a chunk a strongly decaying
# head has many log-decays down there. Clamping at -87 turns a weight below 1.7e-38 into 1.7e-38: far
# below fp32 resolution of anything it is added to.
_EXP_FLOOR = -87.0
# `ssd_chunked` works through the chunks a group at a time, with about this many fp32 elements (8 MB) of
# per-chunk temporaries in a group.
_GROUP_ELEMENTS = 1 << 21
# On CPU the scan runs in chunks of at most this many steps, whatever the model's chunk_size (128 for
# Nano). Any chunking computes the same function: the chunk size only trades the quadratic work inside
# chunks against the state work between them, and with head_dim 64 and state 128 the balance on CPU is at
# 64 (benchmarks/ssd.py prints both). GPUs run NVIDIA's chunk_size through the mamba_ssm kernels.
CPU_CHUNK = 64


def _heads_per_group(h: int, g: int) -> int:
    if h % g:
        raise ValueError(f"{h} heads do not split into {g} groups")
    return h // g


def softplus_dt(dt: Tensor, dt_bias: Tensor | None) -> Tensor:
    """softplus(dt + dt_bias) in fp32 (spec §2 step 4, before any clamp); `dt` as it is without a bias."""
    return dt if dt_bias is None else F.softplus(dt.float() + dt_bias.float())


def _skip(y: Tensor, x: Tensor, D: Tensor | None) -> Tensor:
    return y if D is None else y + D.float()[:, None] * x.float()


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, initial_state: Tensor | None = None,
    state_every: int = 0, *, D: Tensor | None = None, dt_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """The SSD algorithm of Mamba-2: quadratic attention-like work inside chunks, a linear recurrence across them.

    Any length works: the tail is padded with dt = 0, which neither decays the state nor feeds it.
    `state_every` = e > 0 (L a multiple of e) also returns the states entering positions 0, e, 2e, …,
    [b, L/e, h, p, n] (index 0 is the initial state), from the same pass: the scan then uses chunks of
    gcd(chunk_size, e), so that every multiple of e is a chunk boundary (training reads the state at every
    block boundary this way).
    Chunks are processed a group at a time (`_scan_group`), so that the per-head [s, s] temporaries stay a
    few MB whatever the length: memory is bounded on long prompts, and the allocator hands the same blocks
    back for every group instead of mapping (and page-faulting in) fresh memory — on CPU that was as much
    time as the arithmetic.
    """
    if D is not None or dt_bias is not None:
        out = ssd_chunked(x, softplus_dt(dt, dt_bias), A, B, C, chunk_size, initial_state, state_every)
        return (_skip(out[0], x, D), *out[1:])
    b, L, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    r = _heads_per_group(h, g)
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    if L == 0:
        final = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.float().clone()
        empty = x.new_zeros(b, 0, h, p)
        return (empty, final, x.new_zeros(b, 0, h, p, n)) if state_every else (empty, final)

    if x.device.type == "cpu":
        chunk_size = min(chunk_size, CPU_CHUNK)
    if state_every:
        if L % state_every:
            raise ValueError(f"length {L} is not a multiple of state_every={state_every}")
        chunk_size = math.gcd(chunk_size, state_every)
    elif L < chunk_size:
        chunk_size = L  # one chunk, no padding: short inputs (a denoiser block, a decode burst) stay cheap
    pad = (-L) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c, s = (L + pad) // chunk_size, chunk_size
    x = x.reshape(b, c, s, g, r, p)

    # Layout. Every contraction below is a batched matmul, and a batched matmul copies any operand whose
    # batch dimensions do not fold into one stride. So each big intermediate is produced directly in the
    # order its consumer reads: an elementwise op writes its output in the memory order of its first input
    # that has one, and the small per-(step, head) factors are put first, already in the wanted order.
    # (Only speed depends on this: `.contiguous()` / `reshape` are no-ops when it holds, copies if not.)
    # Comments give logical dims, and the memory order where it differs. States are kept as [n, r·p]
    # matrices per group: the r heads of a group share B and C, so they are folded into the columns of the
    # state matmuls instead of broadcasting B and C r times.
    #
    # First, everything that is small (per step and head, or per step and group) for all chunks at once.
    dt = dt.reshape(b, c, s, g, r).permute(0, 1, 3, 4, 2).contiguous()  # [b,c,g,r,s]
    a_cum = torch.cumsum(dt * A.reshape(g, r, 1), dim=-1)  # running log-decay inside each chunk, [b,c,g,r,s]
    B = B.reshape(b, c, s, g, n).transpose(2, 3).contiguous()  # [b,c,g,s,n]
    C = C.reshape(b, c, s, g, n).transpose(2, 3).contiguous()
    # C·B, zeroed above the diagonal (the future); the log-decay is clamped to ≤ 0 there (below), so the
    # future gets an exact 0 weight with finite gradients.
    cb = (C @ B.transpose(-1, -2)).tril_()  # [b,c,g,t,u]
    to_end = torch.exp(a_cum[..., -1:] - a_cum).transpose(-1, -2).contiguous()  # [b,c,g,s,r]: step → chunk end
    grow = torch.exp(a_cum).permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 2, 4)  # [b,c,g,s,r], memory [b,c,s,g,r]
    chunk_decay = torch.exp(a_cum[..., -1])[..., None].expand(b, c, g, r, p).reshape(b, c, g, 1, r * p)
    small = (dt, a_cum, B, C, cb, to_end, grow, chunk_decay)

    state = (torch.zeros(b, g, n, r * p, device=x.device) if initial_state is None
             else initial_state.float().reshape(b, g, r, p, n).permute(0, 1, 4, 2, 3).reshape(b, g, n, r * p))
    # Under autograd nothing is written into preallocated buffers; without it the output is (not under
    # torch.compile either: dynamo cannot trace `out=` into a strided view, and inductor plans buffers itself).
    out = None if torch.is_grad_enabled() or torch.compiler.is_compiling() else x.new_empty(b, c, s, g, r, p)
    per = max(1, _GROUP_ELEMENTS // (h * (s * s + 4 * s * p + 2 * n * p)))  # chunks per group
    if torch.compiler.is_compiling():
        per = c  # one group: no guard on the group size, which depends on the (symbolic) length
    ys, starts = [], []
    for c0 in range(0, c, per):
        part = slice(c0, min(c, c0 + per))
        y_part, start_part, state = _scan_group(x[:, part], *(t[:, part] for t in small), state,
                                                None if out is None else out[:, part])
        if out is None:
            ys.append(y_part)
        if state_every:  # (otherwise let each group's buffers go, so that the next group reuses them)
            starts.append(start_part)
    y = out if out is not None else ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    y = y.reshape(b, c * s, h, p)[:, :L]
    final = state.view(b, g, n, r, p).permute(0, 1, 3, 4, 2).reshape(b, h, p, n)
    if state_every:
        start_states = starts[0] if len(starts) == 1 else torch.cat(starts, dim=1)  # [b,c,g,n,r·p]
        every = start_states[:, ::state_every // chunk_size].view(b, L // state_every, g, n, r, p)
        return y, final, every.permute(0, 1, 2, 4, 5, 3).reshape(b, L // state_every, h, p, n)
    return y, final


def _scan_group(x: Tensor, dt: Tensor, a_cum: Tensor, B: Tensor, C: Tensor, cb: Tensor, to_end: Tensor,
                grow: Tensor, chunk_decay: Tensor, state: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """A run of whole chunks, with the small tensors `ssd_chunked` prepared (same names and layouts) and x
    [b,c,s,g,r,p], state [b,g,n,r·p]. Returns y [b,c,s,g,r,p] (written into `out` when given), the states
    entering each chunk [b,c,g,n,r·p] and the state after the last one."""
    b, c, s, g, r, p = x.shape
    n = B.shape[-1]
    xdt = (dt[..., None] * x.permute(0, 1, 3, 4, 2, 5)).contiguous()  # [b,c,g,r,s,p]

    # 1. Inside each chunk: y_t = Σ_{u≤t} (C_t·B_u) exp(a_cum[t] - a_cum[u]) dt_u x_u. (The difference of
    # running sums is what the mamba_ssm kernels use too. In-place ops: these [s, s] tensors are the big ones.)
    decay = (a_cum[..., :, None] - a_cum[..., None, :]).clamp_(_EXP_FLOOR, 0.0).exp_()  # [b,c,g,r,t,u]
    scores = decay * cb[:, :, :, None] if out is None else decay.mul_(cb[:, :, :, None])
    y_in = scores @ xdt  # [b,c,g,r,s,p]

    # 2. Each chunk's own contribution to the state at its end, starting from zero.
    fed = (to_end[..., None] * xdt.transpose(3, 4)).reshape(b, c, g, s, r * p)  # memory order as named
    chunk_states = B.transpose(-1, -2) @ fed  # [b,c,g,n,r·p]

    # 3. Across chunks: a short, memory-bound recurrence over the chunk boundaries. states[:, k] is the
    # state entering chunk k, states[:, c] the one after the last; without autograd each step writes into
    # its slot.
    if out is None:
        steps = [state]
        for ci in range(c):
            steps.append(torch.addcmul(chunk_states[:, ci], steps[-1], chunk_decay[:, ci]))
        states = torch.stack(steps, dim=1)  # [b,c+1,g,n,r·p]
    else:
        states = x.new_empty(b, c + 1, g, n, r * p)
        states[:, 0] = state
        for ci in range(c):
            torch.addcmul(chunk_states[:, ci], states[:, ci], chunk_decay[:, ci], out=states[:, ci + 1])
    start_states = states[:, :c]

    # 4. The entering state's contribution, y_t += exp(a_cum[t]) C_t · h_start, written straight into the
    # output's memory order [b,c,s,g,r,p] (the exp factor, laid out that way, leads).
    from_start = (C @ start_states).view(b, c, g, s, r, p)
    if out is None:
        y = (grow[..., None] * from_start + y_in.transpose(3, 4)).transpose(2, 3)  # [b,c,s,g,r,p]
    else:
        y = out
        torch.addcmul(y_in.transpose(3, 4), grow[..., None], from_start, out=out.transpose(2, 3))
    return y, start_states, states[:, c]


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
             dt_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One time step of the recurrence (decode). state [b,h,p,n], x [b,h,p], dt [b,h], B/C [b,g,n]."""
    h, g = x.shape[1], B.shape[1]
    r = _heads_per_group(h, g)
    B = B.float().repeat_interleave(r, dim=1)  # [b,h,n]
    C = C.float().repeat_interleave(r, dim=1)
    dt = softplus_dt(dt, dt_bias).float()
    decay = torch.exp(dt * A.float())[..., None, None]  # [b,h,1,1]
    new_state = state.float() * decay + (dt[..., None] * x.float())[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    return _skip(y, x, D), new_state


def ssd_sequential(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 0, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference: `ssd_step` applied token by token. `chunk_size` is accepted and ignored (same signature)."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    state = torch.zeros(b, h, p, n, device=x.device) if initial_state is None else initial_state.float()
    ys = []
    for t in range(L):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=torch.float32)
    return y, state
