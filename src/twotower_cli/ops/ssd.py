"""Mamba-2 state-space scan (SSD) in plain PyTorch: chunked prefill, one-step decode, sequential reference.

The recurrence, per head (spec §2, step 5), with `dt` already softplus'ed and clamped and `A` negative:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t        h: [head_dim, state]
    y_t = h_t · C_t                                          (the D skip is the caller's job)

Shapes: b batch, L length, h heads, p head_dim, g groups, n state; head hh reads group hh // (h // g).

    ssd_chunked(x[b,L,h,p], dt[b,L,h], A[h], B[b,L,g,n], C[b,L,g,n], chunk_size, initial_state[b,h,p,n] | None)
        -> y[b,L,h,p], final_state[b,h,p,n]
    ssd_sequential(...)   same contract, one time step at a time (the reference the tests compare against)
    ssd_step(state[b,h,p,n], x[b,h,p], dt[b,h], A[h], B[b,g,n], C[b,g,n]) -> y[b,h,p], new_state[b,h,p,n]

All math is fp32 whatever the input dtype; outputs and states are fp32 (the caller casts). Nothing is
modified in place: the initial state passed in is never written to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _heads_per_group(h: int, g: int) -> int:
    if h % g:
        raise ValueError(f"{h} heads do not split into {g} groups")
    return h // g


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, initial_state: Tensor | None = None,
    state_every: int = 0,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """The SSD algorithm of Mamba-2: quadratic attention-like work inside chunks, a linear recurrence across them.

    Any length works: the tail is padded with dt = 0, which neither decays the state nor feeds it.
    `state_every` = e > 0 (L a multiple of e) also returns the states entering positions 0, e, 2e, …,
    [b, L/e, h, p, n] (index 0 is the initial state), from the same pass: the scan then uses chunks of
    gcd(chunk_size, e), so that every multiple of e is a chunk boundary (training reads the state at every
    block boundary this way).
    Internally everything is laid out head-major, [b, c, g, r, s, ...] (c chunks of s steps, r = h // g heads
    per group), so that every contraction is a plain batched matmul.
    """
    b, L, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    r = _heads_per_group(h, g)
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()

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

    x = x.reshape(b, c, s, g, r, p).permute(0, 1, 3, 4, 2, 5)  # [b,c,g,r,s,p]
    dt = dt.reshape(b, c, s, g, r).permute(0, 1, 3, 4, 2)  # [b,c,g,r,s]
    B = B.reshape(b, c, s, g, n).transpose(2, 3)  # [b,c,g,s,n]
    C = C.reshape(b, c, s, g, n).transpose(2, 3)
    xdt = x * dt[..., None]
    a_cum = torch.cumsum(dt * A.reshape(g, r, 1), dim=-1)  # running log-decay inside each chunk, [b,c,g,r,s]

    # 1. Inside each chunk: y_t = Σ_{u≤t} (C_t·B_u) exp(a_cum[t] - a_cum[u]) dt_u x_u.
    # (The difference of running sums is what the mamba_ssm kernels use too; masking to -inf *before* exp
    # keeps the upper triangle at exactly 0 with finite gradients. In-place ops: these are the big tensors.)
    causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    decay = (a_cum[..., :, None] - a_cum[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()
    scores = (C @ B.transpose(-1, -2))[:, :, :, None] * decay  # [b,c,g,r,t,u]
    y = scores @ xdt  # [b,c,g,r,s,p]

    # 2. Each chunk's own contribution to the state at its end, starting from zero. States are kept as
    # [n, p] (transposed) inside this function so that both matmuls below read contiguous operands.
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b,c,g,r,s]
    # The r heads of a group share B: fold them into the matmul's columns instead of broadcasting B r times.
    fed = (xdt * to_end[..., None]).permute(0, 1, 2, 4, 3, 5).reshape(b, c, g, s, r * p)  # [b,c,g,s,r·p]
    chunk_states = (B.transpose(-1, -2) @ fed).view(b, c, g, n, r, p).permute(0, 1, 2, 4, 3, 5)  # [b,c,g,r,n,p]

    # 3. Across chunks: a short recurrence over the c chunk boundaries (c = L / chunk_size, small).
    chunk_decay = torch.exp(a_cum[..., -1])[..., None, None]  # [b,c,g,r,1,1]
    state = (torch.zeros(b, g, r, n, p, device=x.device) if initial_state is None
             else initial_state.float().reshape(b, g, r, p, n).transpose(-1, -2))
    starts = []
    for ci in range(c):
        starts.append(state)
        state = state * chunk_decay[:, ci] + chunk_states[:, ci]
    start_states = torch.stack(starts, dim=1)  # state entering each chunk, [b,c,g,r,n,p]

    # 4. The entering state's contribution: y_t += exp(a_cum[t]) C_t · h_start.
    # (C shared by the r heads of a group, as B above: one matmul over [n, r·p].)
    entering = start_states.permute(0, 1, 2, 4, 3, 5).reshape(b, c, g, n, r * p)
    from_start = (C @ entering).view(b, c, g, s, r, p).permute(0, 1, 2, 4, 3, 5)  # [b,c,g,r,s,p]
    y = y + from_start * torch.exp(a_cum)[..., None]

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * s, h, p)[:, :L]
    final = state.transpose(-1, -2).reshape(b, h, p, n)
    if state_every:
        every = start_states[:, ::state_every // chunk_size].transpose(-1, -2)  # [b,L/e,g,r,p,n]
        return y, final, every.reshape(b, L // state_every, h, p, n)
    return y, final


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One time step of the recurrence (decode). state [b,h,p,n], x [b,h,p], dt [b,h], B/C [b,g,n]."""
    h, g = x.shape[1], B.shape[1]
    r = _heads_per_group(h, g)
    B = B.float().repeat_interleave(r, dim=1)  # [b,h,n]
    C = C.float().repeat_interleave(r, dim=1)
    dt = dt.float()
    decay = torch.exp(dt * A.float())[..., None, None]  # [b,h,1,1]
    new_state = state.float() * decay + (dt[..., None] * x.float())[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    return y, new_state


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
