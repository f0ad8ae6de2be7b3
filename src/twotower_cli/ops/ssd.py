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

import torch
import torch.nn.functional as F
from torch import Tensor


def _heads_per_group(h: int, g: int) -> int:
    if h % g:
        raise ValueError(f"{h} heads do not split into {g} groups")
    return h // g


def _segsum(a: Tensor) -> Tensor:
    """[..., s] → [..., s, s] with out[..., t, u] = a[u+1] + ... + a[t] for t ≥ u and -inf above the diagonal.

    Summing a masked copy (rather than subtracting two cumulative sums) keeps the small in-chunk sums exact
    even when the running cumsum is large, so exp() of it stays accurate in fp32.
    """
    s = a.shape[-1]
    rep = a[..., None].expand(*a.shape, s)  # rep[..., k, u] = a[k]
    strictly_lower = torch.tril(torch.ones(s, s, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = torch.cumsum(rep.masked_fill(~strictly_lower, 0.0), dim=-2)  # sum over u < k ≤ t
    lower = torch.tril(torch.ones(s, s, dtype=torch.bool, device=a.device))
    return seg.masked_fill(~lower, float("-inf"))


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The SSD algorithm of Mamba-2: quadratic attention-like work inside chunks, a linear recurrence across them.

    Any length works: the tail is padded with dt = 0, which neither decays the state nor feeds it.
    """
    b, L, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    r = _heads_per_group(h, g)
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()

    pad = (-L) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c, s = (L + pad) // chunk_size, chunk_size

    # Chunk and group: x → [b,c,s,g,r,p], dt → [b,c,s,g,r], B/C → [b,c,s,g,n].
    x = x.reshape(b, c, s, g, r, p)
    xdt = x * dt.reshape(b, c, s, g, r, 1)
    B = B.reshape(b, c, s, g, n)
    C = C.reshape(b, c, s, g, n)
    a = (dt * A).reshape(b, c, s, g, r).permute(0, 1, 3, 4, 2)  # log-decay per step, [b,c,g,r,s]
    a_cum = torch.cumsum(a, dim=-1)  # [b,c,g,r,s]

    # 1. Inside each chunk: y_t += Σ_{u≤t} (C_t·B_u) exp(a_{u+1}+…+a_t) dt_u x_u.
    decay = torch.exp(_segsum(a))  # [b,c,g,r,t,u]
    scores = torch.einsum("bctgn,bcugn->bcgtu", C, B)[:, :, :, None] * decay  # [b,c,g,r,t,u]
    y = torch.einsum("bcgrtu,bcugrp->bctgrp", scores, xdt)

    # 2. Each chunk's own contribution to the state at its end (starting from zero).
    to_end = decay[..., -1, :]  # exp(a_{u+1}+…+a_last), [b,c,g,r,u]
    chunk_states = torch.einsum("bcgru,bcugn,bcugrp->bcgrpn", to_end, B, xdt)

    # 3. Across chunks: a short recurrence over c chunk boundaries (c = L / chunk_size, small).
    chunk_decay = torch.exp(a_cum[..., -1])  # [b,c,g,r]
    state = (torch.zeros(b, g, r, p, n, device=x.device) if initial_state is None
             else initial_state.float().reshape(b, g, r, p, n))
    starts = []
    for ci in range(c):
        starts.append(state)
        state = state * chunk_decay[:, ci, :, :, None, None] + chunk_states[:, ci]
    start_states = torch.stack(starts, dim=1)  # state entering each chunk, [b,c,g,r,p,n]

    # 4. The entering state's contribution: y_t += exp(a_1+…+a_t) C_t · h_start.
    y = y + torch.einsum("bctgn,bcgrpn->bctgrp", C, start_states) * torch.exp(a_cum).permute(0, 1, 4, 2, 3)[..., None]

    y = y.reshape(b, c * s, h, p)[:, :L]
    return y, state.reshape(b, h, p, n)


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
