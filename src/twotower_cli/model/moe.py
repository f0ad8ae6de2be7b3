"""Mixture of experts of NemotronH (`E` layers, spec §2): sigmoid router with a selection-only bias,
relu² experts, one shared expert.

    Router(x [T, H], dtype) -> (weights [T, k] in `dtype`, experts [T, k] long)
    MoE(x [..., H]) -> [..., H]

Router: logits = x @ gate.weight^T computed in `router_dtype` (fp32; fp64 for a TwoTower's towers, as
NVIDIA's release does; spec §9: bf16 flips near-tie choices); s = sigmoid(logits). Experts are *chosen*
by s + e_score_correction_bias, with DeepSeek-V3 grouped top-k when n_group > 1 (keep the topk_group groups
whose two best biased scores sum highest); the *weights* are the unbiased s at the chosen experts,
normalised to sum 1 (+1e-20) when norm_topk_prob, times routed_scaling_factor.

Experts run on the tokens routed to them (tokens sorted by expert, one matmul pair per expert that got any),
never a loop over tokens. The weighted sum is accumulated in the router dtype, then cast back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from twotower_cli.config import NemotronHConfig
from twotower_cli.model.mlp import MLP


class Router(nn.Module):
    def __init__(self, cfg: NemotronHConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # A buffer, not a parameter: it is a load-balancing statistic, not trained by gradient.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        scores = torch.sigmoid(x.to(dtype) @ self.weight.to(dtype).T)  # [T, E]
        choice = scores + self.e_score_correction_bias.to(dtype)
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, n_group]
            best_groups = group_score.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.n_experts)
        experts = choice.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts


class MoE(nn.Module):
    def __init__(self, cfg: NemotronHConfig, router_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.router_dtype = router_dtype
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.mlp_bias) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.shared_expert_size * cfg.n_shared_experts, cfg.mlp_bias)
                               if cfg.n_shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        weights, experts = self.gate(flat, self.router_dtype)  # [T, k]
        k = experts.shape[1]

        # Sort the T*k (token, slot) assignments by expert so each expert sees one contiguous slice.
        order = experts.flatten().argsort(stable=True)
        tokens = order // k
        counts = torch.bincount(experts.flatten(), minlength=len(self.experts)).tolist()
        routed_w = weights.flatten()[order]
        out = torch.zeros(flat.shape, dtype=weights.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = tokens[start:start + n]
                y = self.experts[e](flat[idx])
                out.index_add_(0, idx, y.to(out.dtype) * routed_w[start:start + n, None])
            start += n
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)
