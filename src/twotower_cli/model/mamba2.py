"""The Mamba-2 mixer of NemotronH (`M` layers, spec §2 steps 1-7).

    forward(x [b, L, H], state: MambaState | None, pad_mask [b, L] bool | None) -> (out [b, L, H], new_state)

`state` is the state *before* these L tokens (None = zeros); it is read, never written: the new state is a
new object. This is what lets the denoiser (spec §5) start every block from the context tower's state. The
one exception is `in_place=True`, which only `NemotronHModel` passes for its own cache: on a one-token step
the CUDA kernels then update that cache's tensors instead of copying them (snapshots are clones, so
nothing else sees the change).
L == 1 with a state uses the one-step recurrence; anything else the chunked SSD scan from `state.ssm`, with
the causal conv continuing from `state.conv`. The scan runs in fp32 whatever the module dtype.

Each op (causal conv, chunked scan, one-step update, gated norm) runs the mamba-ssm / causal-conv1d CUDA
kernel when `ops.kernels.use_kernels` says so (CUDA tensors, kernels importable, TWOTOWER_KERNELS not
torch), else the plain-torch reference, behind the same signature; the training path (`block_size`) is
always torch (the kernels do not return block-boundary states).

`pad_mask` False marks left-padding: the raw xBC columns, x, B, C and dt are zeroed there, so a pad neither
feeds nor decays the SSM state (dt = 0 ⇒ exp(dt·A) = 1) and puts zero columns into the conv window, exactly
what a fresh sequence sees before its first token (spec §9).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower_cli.config import NemotronHConfig
from twotower_cli.model.cache import MambaState
from twotower_cli.model.derived import derived
from twotower_cli.model.norm import GatedGroupRMSNorm
from twotower_cli.ops import kernels
from twotower_cli.ops.ssd import softplus_dt, ssd_chunked, ssd_step


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: NemotronHConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.mamba_num_heads, cfg.mamba_head_dim
        self.n_groups, self.d_state = cfg.n_groups, cfg.ssm_state_size
        self.d_inner, self.conv_dim, self.kernel = cfg.d_inner, cfg.conv_dim, cfg.conv_kernel
        self.chunk_size = cfg.chunk_size
        self.time_step_limit = cfg.time_step_limit  # the only dt clamp (spec §1, §9)

        self.in_proj = nn.Linear(cfg.hidden_size, cfg.in_proj_dim, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedGroupRMSNorm(self.d_inner, self.n_groups, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.mamba_proj_bias)

    def conv(self, xBC: Tensor, conv_state: Tensor | None, keep_state: bool = True,
             in_place: bool = False) -> tuple[Tensor, Tensor | None]:
        """Causal depthwise conv + SiLU. xBC [b, L, conv_dim] raw; conv_state [b, conv_dim, K] (previous raw
        columns, None = zeros). Returns (activated [b, L, conv_dim], new conv_state = last K raw columns, or
        None when not `keep_state` and L > 1)."""
        if kernels.use_kernels(xBC, kernels.CONV):
            return kernels.call("causal_conv1d", lambda: kernels.causal_conv(
                xBC, conv_state, self.conv1d.weight, self.conv1d.bias, keep_state, in_place),
                lambda: self._conv_torch(xBC, conv_state, keep_state))
        return self._conv_torch(xBC, conv_state, keep_state)

    def _conv_torch(self, xBC: Tensor, conv_state: Tensor | None, keep_state: bool = True) -> tuple[Tensor, Tensor | None]:
        b, L, _ = xBC.shape
        cols = xBC.transpose(1, 2)  # [b, conv_dim, L]
        if conv_state is None:
            conv_state = cols.new_zeros(b, self.conv_dim, self.kernel)
        window = torch.cat([conv_state.to(cols.dtype), cols], dim=-1)  # [b, conv_dim, K + L]
        # The kernel needs K-1 columns of left context; the state keeps K (as the reference caches do).
        if kernels.small_conv_ok(window[..., 1:], self.kernel):  # decode / short blocks on CPU: K multiply-adds
            out = kernels.conv_window(window[..., 1:], self.conv1d.weight, self.conv1d.bias)
        else:
            out = F.conv1d(window[..., 1:], self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        # clone: a view would keep the whole [conv_dim, K + L] window of a long prefill alive.
        return F.silu(out).transpose(1, 2), window[..., -self.kernel:].clone() if keep_state else None

    def forward(self, x: Tensor, state: MambaState | None = None, pad_mask: Tensor | None = None,
                block_size: int = 0, keep_state: bool = True, in_place: bool = False) -> tuple[Tensor, MambaState | None]:
        """`block_size` = S > 0 (training, spec §8; L a multiple of S): the state returned is not the final
        one but the state entering each of the nb = L/S blocks, one MambaState of batch b·nb (row i·nb + j:
        sequence i before block j), read off the same chunked scan. `keep_state=False` (the denoiser, which
        never writes a state back): no new state is built, None is returned in its place. `in_place=True` (the
        model's own cache): on a one-token step the kernels may update `state`'s tensors instead of copying
        them (the torch path still returns new ones); the caller stores the returned state either way."""
        b, L, _ = x.shape
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        keep = None if pad_mask is None else pad_mask[..., None].to(xBC.dtype)  # [b, L, 1]
        if keep is not None:
            xBC = xBC * keep
        raw = xBC

        xBC, new_conv = self.conv(xBC, None if state is None else state.conv, keep_state or bool(block_size),
                                  in_place and L == 1)
        if keep is not None:
            xBC = xBC * keep
        xs, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        xs = xs.reshape(b, L, self.n_heads, self.head_dim)
        B = B.reshape(b, L, self.n_groups, self.d_state)
        C = C.reshape(b, L, self.n_groups, self.d_state)

        A = derived(self, "A", self.A_log, lambda a_log: -torch.exp(a_log.float()))  # kept for inference
        lo, hi = self.time_step_limit
        # The scan adds the D skip (ops.ssd's contract). Without a dt clamp or pads (a decode step, a denoiser
        # block, an unpadded prompt) it also takes the raw dt with dt_bias: the CUDA kernels then do
        # softplus(dt + dt_bias) and the D skip inside the scan instead of in six launches around it.
        skip = dict(D=self.D)
        if not block_size and pad_mask is None and lo <= 0.0 and hi == math.inf:
            skip["dt_bias"] = self.dt_bias
        else:
            dt = softplus_dt(dt, self.dt_bias)
            if lo > 0.0 or hi < math.inf:
                dt = dt.clamp(min=lo, max=hi)
            if pad_mask is not None:
                dt = dt * pad_mask[..., None].float()

        init = None if state is None else state.ssm
        if block_size:
            y, _, starts = ssd_chunked(xs, dt, A, B, C, self.chunk_size, init, state_every=block_size, **skip)
        elif state is not None and L == 1:
            args = (state.ssm, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
            if kernels.use_kernels(xs):
                step = kernels.ssd_step_in_place if in_place else kernels.ssd_step
                y, ssm = kernels.call("selective_state_update", step, ssd_step, *args, **skip)
            else:
                y, ssm = ssd_step(*args, **skip)
            y = y[:, None]
        elif kernels.use_kernels(xs):
            y, ssm = kernels.call("mamba_chunk_scan_combined", kernels.ssd_chunked, ssd_chunked,
                                  xs, dt, A, B, C, self.chunk_size, init, **skip)
        else:
            y, ssm = ssd_chunked(xs, dt, A, B, C, self.chunk_size, init, **skip)
        out = self.out_proj(self.norm(y.reshape(b, L, self.d_inner), z))
        if block_size:
            return out, self._block_states(raw, state, starts, block_size)
        return out, MambaState(new_conv, ssm) if keep_state else None

    def _block_states(self, raw: Tensor, state: MambaState | None, starts: Tensor, S: int) -> MambaState:
        """States entering every block of S tokens: the conv state is the K raw xBC columns before the block
        (raw [b, L, conv_dim], after `state.conv`), the SSM state the scan's `starts` [b, nb, h, p, n]."""
        b, L, _ = raw.shape
        nb = L // S
        prev = raw.new_zeros(b, self.conv_dim, self.kernel) if state is None else state.conv.to(raw.dtype)
        window = torch.cat([prev, raw.transpose(1, 2)], dim=-1)  # [b, conv_dim, K + L]
        conv = window.unfold(-1, self.kernel, S)[:, :, :nb]  # [b, conv_dim, nb, K]: columns jS-K .. jS-1
        conv = conv.permute(0, 2, 1, 3).reshape(b * nb, self.conv_dim, self.kernel)
        return MambaState(conv, starts.reshape(b * nb, *starts.shape[2:]))
