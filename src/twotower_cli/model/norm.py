"""RMS norms of NemotronH (spec §2): the block/final RMSNorm and Mamba-2's gated, grouped RMSNorm.

Both normalise in fp32 and multiply by the weight in fp32 before casting back, as NVIDIA's reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower_cli.ops import kernels


class RMSNorm(nn.Module):
    """x [..., dim] → x * rsqrt(mean(x²) + eps) * weight, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm is that formula; on CUDA it is one fused kernel instead of six (a decode step has ~50
        # of these norms a tower); on the CPU it runs the same ops. For bf16/fp16 it already computes in
        # fp32, the weight multiply included, and rounds once (CUDA's kernel accumulates in fp32; the CPU
        # upcasts), so the input and weight go in as they are: casting them here and the result back
        # would be three more kernels a norm, for the same numbers (tests/test_model.py, test_kernels.py on CUDA).
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class GatedGroupRMSNorm(nn.Module):
    """Mamba-2's output norm: u = y * silu(z), RMS-normalised separately in each of n_groups channel groups.

    forward(y [..., d_inner], z [..., d_inner]) → [..., d_inner] in z's dtype. The gate is applied *before*
    the norm and the norm is per group, not over all of d_inner (spec §9: both matter).
    """

    def __init__(self, d_inner: int, n_groups: int, eps: float = 1e-5):
        super().__init__()
        if d_inner % n_groups:
            raise ValueError(f"d_inner {d_inner} does not split into {n_groups} groups")
        self.weight = nn.Parameter(torch.ones(d_inner))
        self.n_groups = n_groups
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        if kernels.use_kernels(z):  # mamba-ssm's gated RMSNorm kernel (ops/kernels.py), same math
            return kernels.call("rmsnorm_gated", lambda: kernels.gated_rmsnorm(y, z, self.weight, self.n_groups, self.eps),
                                lambda: self._torch(y, z))
        return self._torch(y, z)

    def _torch(self, y: Tensor, z: Tensor) -> Tensor:
        u = y.float() * F.silu(z.float())
        # each group RMS-normalised by F.rms_norm over the group's channels: one op where the written-out
        # formula was five (on the CPU the same arithmetic, bit for bit)
        grouped = F.rms_norm(u.unflatten(-1, (self.n_groups, -1)), (u.shape[-1] // self.n_groups,), eps=self.eps)
        return (self.weight.float() * grouped.flatten(-2)).to(z.dtype)
