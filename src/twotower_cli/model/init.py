"""Random initialisation of a *new* NemotronH model (tests, the tiny demo model). Never called after loading:
spec §9, re-initialising a loaded weight ruins the model. All randomness comes from the generator passed in.

Mamba-2 parameters follow the reference recipe: A_log = log(U[1, 16]); dt_bias = softplus⁻¹(dt) with dt
log-uniform in [1e-3, 1e-1]; D = 1. Norm weights are 1, Linear and Embedding weights N(0, std²), biases 0,
the depthwise conv U(±1/sqrt(K)) (PyTorch's default fan-in bound). The router's correction bias gets small
random values (N(0, std²)), not zeros, so that tests exercise the biased selection. Stacked expert weights
are drawn expert by expert, up then down, so a seed gives the weights a list of per-expert MLPs got.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from twotower_cli.model.mamba2 import Mamba2Mixer
from twotower_cli.model.moe import Experts, Router
from twotower_cli.model.norm import GatedGroupRMSNorm, RMSNorm


@torch.no_grad()
def init_nemotron_h(model: nn.Module, generator: torch.Generator, std: float = 0.02) -> nn.Module:
    """Fill every parameter and buffer of `model` (a NemotronH tower or LM, or any module built from ours)."""

    def normal(t: torch.Tensor, s: float) -> None:
        t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32) * s)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=generator, dtype=torch.float32))

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            normal(module.weight, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Conv1d):
            bound = 1.0 / math.sqrt(module.kernel_size[0])
            uniform(module.weight, -bound, bound)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, (RMSNorm, GatedGroupRMSNorm)):
            module.weight.fill_(1.0)
        elif isinstance(module, Experts):  # expert by expert, up then down: the draws of a list of MLPs
            for j in range(module.n):
                normal(module.up_proj[j], std)
                normal(module.down_proj[j], std)
            for bias in (module.up_bias, module.down_bias):
                if bias is not None:
                    bias.zero_()
        elif isinstance(module, Router):
            normal(module.weight, std)
            normal(module.e_score_correction_bias, std)
        if isinstance(module, Mamba2Mixer):
            h = module.n_heads
            A = torch.empty(h)
            uniform(A, 1.0, 16.0)
            module.A_log.copy_(torch.log(A))
            log_dt = torch.empty(h)
            uniform(log_dt, math.log(1e-3), math.log(1e-1))
            dt = torch.exp(log_dt)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
            module.D.fill_(1.0)
    return model
