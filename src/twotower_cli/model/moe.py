"""Mixture of experts of NemotronH (`E` layers, spec §2): sigmoid router with a selection-only bias,
relu² experts, one shared expert.

    Router(x [T, H], dtype) -> (weights [T, k] in `dtype`, experts [T, k] long)
    Experts(x [N, H] sorted by expert, ends [E] int32) -> [N, H]
    MoE(x [..., H]) -> [..., H]
    describe(device, dtype) -> str          how the routed experts run there (grouped GEMM or loop, and why)

Router: logits = x @ gate.weight^T computed in `router_dtype` (fp32; fp64 for a TwoTower's towers, as
NVIDIA's release does; spec §9: bf16 flips near-tie choices); s = sigmoid(logits). Experts are *chosen*
by s + e_score_correction_bias, with DeepSeek-V3 grouped top-k when n_group > 1 (keep the topk_group groups
whose two best biased scores sum highest); the *weights* are the unbiased s at the chosen experts,
normalised to sum 1 (+1e-20) when norm_topk_prob, times routed_scaling_factor.

Experts run on the tokens routed to them, never a loop over tokens: the T*k (token, slot) pairs are sorted by
expert, and `Experts` runs each expert on its contiguous slice. Its weights are stacked per layer
(up_proj [E, I, H], down_proj [E, H, I], as transformers holds them in memory), so where torch's grouped GEMM
runs (`F.grouped_mm`, for inference: CUDA bf16 on sm80+; CPU floats once rows ≥ experts / 8) a layer's
experts are two kernels whatever the routing, with no host sync; elsewhere (training, fp32 on CUDA, a decode
step on the CPU, older torch) one matmul pair per expert that got a token. Both give the same numbers (bit
for bit on the CPU, biases aside: F.linear adds those before rounding). The weighted sum is accumulated in
the router dtype, then cast back.

The state dict keeps NVIDIA's layout, one tensor per expert (`experts.{j}.up_proj.weight`, rows of the
stacks), so checkpoints, the loader and the trainer's files never see the stacking; named_parameters() shows
the stacks (`experts.up_proj`). Loading assigns a stack whole when the per-expert tensors it is given are the
rows of one tensor (`load_state` builds them so), and copies them into one otherwise.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower_cli.config import NemotronHConfig
from twotower_cli.model.derived import derived
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

    def _in(self, name: str, dtype: torch.dtype) -> Tensor:
        """The weight or bias in the router dtype; for inference the fp32 → fp64 cast of a TwoTower's router is
        kept while the tensor is unchanged (`derived`): two kernels a layer less per step."""
        t = getattr(self, name)
        return t if t.dtype == dtype else derived(self, f"{name}:{dtype}", t, lambda src: src.to(dtype))

    def forward(self, x: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        scores = torch.sigmoid(x.to(dtype) @ self._in("weight", dtype).T)  # [T, E]
        choice = scores + self._in("e_score_correction_bias", dtype)
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


# F.grouped_mm where torch has the public name, else torch._grouped_mm; None on a torch without either.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
MOE_SLICE_TOKENS = 2048  # MoE.forward routes longer inputs (prompts) in slices of this many tokens
CPU_ROWS_PER_GROUP = 8  # on the CPU, group when rows ≥ experts / 8 (see Experts._grouped_runs)
# (device type, dtype) where the grouped GEMM raised once → why; the loop runs there from then on
_GROUPED_FAILED: dict[tuple[str, torch.dtype], str] = {}


def grouped_refusal(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why inference on `device` in `dtype` runs the routed experts as a loop, or None: grouped GEMMs."""
    if _GROUPED_MM is None:
        return "this torch has no grouped GEMM"
    if (device.type, dtype) in _GROUPED_FAILED:
        return f"the grouped GEMM failed: {_GROUPED_FAILED[(device.type, dtype)]}"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"the grouped GEMM takes bf16 on CUDA, not {str(dtype).removeprefix('torch.')}"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "the grouped GEMM needs compute capability 8.0 or newer"
        return None
    if device.type == "cpu":
        return None if dtype in (torch.float32, torch.bfloat16, torch.float16) else f"no grouped GEMM for {dtype}"
    return f"no grouped GEMM on {device.type}"


@functools.lru_cache(maxsize=16)
def _expert_ids(n: int, device: torch.device) -> Tensor:
    """arange(n) on `device`, made once rather than once per MoE layer and step (read only)."""
    return torch.arange(n, device=device)


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """A few words for reports: how the routed experts run for inference on `device` in `dtype`."""
    why = grouped_refusal(device, dtype)
    return "grouped GEMM" if why is None else f"per-expert loop ({why})"


def _stack_rows(rows: list[Tensor]) -> Tensor:
    """torch.stack(rows), without the copy when the rows already are the rows of one tensor, in order."""
    base = rows[0]._base
    if (base is not None and base.shape[0] == len(rows) and base.shape[1:] == rows[0].shape
            and all(r._base is base and r.data_ptr() == base[j].data_ptr() and r.stride() == base[j].stride()
                    and r.dtype == base.dtype for j, r in enumerate(rows))):
        return base
    return torch.stack(rows)


class Experts(nn.Module):
    """The routed relu² experts of one MoE layer, stacked: x [N, H] sorted by expert, expert e's rows ending
    before `ends[e]` ([E] int32, cumulative: grouped GEMM's offsets) → [N, H], row r through its expert e:
    down[e] @ relu(up[e] @ x_r)²."""

    grouped = True  # use F.grouped_mm where it runs (benchmarks and tests switch it off for the loop)

    def __init__(self, n: int, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.n = n
        self.up_proj = nn.Parameter(torch.empty(n, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, intermediate))
        self.up_bias = nn.Parameter(torch.empty(n, intermediate)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(n, hidden)) if bias else None

    def extra_repr(self) -> str:
        e, i, h = self.up_proj.shape
        return f"{e} experts, {h} → {i} → {h}, bias={self.up_bias is not None}"

    def rows(self) -> dict[str, list[str]]:
        """Stacked parameter → its per-expert state-dict keys (relative to this module), row j at index j."""
        names = {"up_proj": "up_proj.weight", "up_bias": "up_proj.bias", "down_proj": "down_proj.weight",
                 "down_bias": "down_proj.bias"}
        return {param: [f"{j}.{key}" for j in range(self.n)] for param, key in names.items()
                if getattr(self, param) is not None}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        rows = self.rows()
        for j in range(self.n):  # expert by expert, as a ModuleList of MLPs would list them
            for param, keys in rows.items():
                t = getattr(self, param)[j]
                destination[prefix + keys[j]] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        assign = local_metadata.get("assign_to_params_buffers", False)
        ours: set[str] = set()
        for param, keys in self.rows().items():
            keys = [prefix + k for k in keys]
            ours.update(keys)
            current = getattr(self, param)
            absent = [k for k in keys if k not in state_dict]
            if absent:
                missing_keys.extend(absent)
                continue
            rows = [state_dict[k] for k in keys]
            want = current.shape[1:]
            bad = [f"size mismatch for {k}: copying a param with shape {tuple(r.shape)}, the shape in the current "
                   f"model is {tuple(want)}." for k, r in zip(keys, rows, strict=True) if r.shape != want]
            if bad:
                error_msgs.extend(bad)
                continue
            value = _stack_rows(rows)
            if assign:
                setattr(self, param, nn.Parameter(value, requires_grad=current.requires_grad))
            else:
                with torch.no_grad():
                    current.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours)

    def _grouped_runs(self, x: Tensor) -> bool:
        if not self.grouped or x.dtype != self.up_proj.dtype or grouped_refusal(x.device, x.dtype):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.up_proj.requires_grad):
            return False  # its backward is young (and raises on the CPU for unaligned or expanded grads)
        if x.device.type == "cuda":  # CUTLASS kernel: rows 16-byte aligned
            return all(d * x.element_size() % 16 == 0 for d in self.up_proj.shape[1:])
        # On the CPU the grouped GEMM walks every group, empty ones too: with few rows over many experts (a
        # decode step: 6 rows, 128 experts) the loop over the used ones is faster (benchmarks/moe.py).
        return x.shape[0] * CPU_ROWS_PER_GROUP >= self.n

    def forward(self, x: Tensor, ends: Tensor) -> Tensor:
        if x.shape[0] and self._grouped_runs(x):
            try:
                return self._grouped(x, ends)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError) as e:  # a torch build whose grouped GEMM refuses this
                why = f"{type(e).__name__}: {e}"
                _GROUPED_FAILED[(x.device.type, x.dtype)] = why
                warnings.warn(f"grouped GEMM failed on {x.device.type} {x.dtype} ({why}); the routed experts run "
                              "as a per-expert loop there from now on", stacklevel=2)
        return self._loop(x, ends)

    def _grouped(self, x: Tensor, ends: Tensor) -> Tensor:
        h = _GROUPED_MM(x, self.up_proj.transpose(1, 2), offs=ends)
        counts = None if self.up_bias is None else torch.diff(ends, prepend=ends.new_zeros(1))
        if counts is not None:
            h = h + self.up_bias.repeat_interleave(counts, dim=0, output_size=x.shape[0])
        y = _GROUPED_MM(torch.relu(h).square(), self.down_proj.transpose(1, 2), offs=ends)
        if counts is not None:
            y = y + self.down_bias.repeat_interleave(counts, dim=0, output_size=x.shape[0])
        return y

    def _loop(self, x: Tensor, ends: Tensor) -> Tensor:
        stacks = [self.up_proj, self.up_bias, self.down_proj, self.down_bias]
        if torch.is_grad_enabled() and self.up_proj.requires_grad:
            # One backward node per stack (unbind's: the per-expert gradients stacked once), not one per
            # expert: indexing a stack per expert would make each expert's backward a zero-filled gradient
            # of the whole stack (25x slower on this CPU at 128 experts, and a stack's size per expert).
            stacks = [t.unbind(0) if t is not None else None for t in stacks]
        up, up_b, down, down_b = ([None] * self.n if t is None else t for t in stacks)
        parts, start = [], 0
        for e, end in enumerate(ends.tolist()):
            if end > start:
                h = F.linear(x[start:end], up[e], up_b[e])
                parts.append(F.linear(torch.relu(h).square(), down[e], down_b[e]))
            start = end
        return torch.cat(parts) if parts else x.new_zeros(x.shape)


class MoE(nn.Module):
    def __init__(self, cfg: NemotronHConfig, router_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.router_dtype = router_dtype
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.mlp_bias)
        # One shared expert of moe_shared_expert_intermediate_size units, whatever n_shared_experts says (> 0):
        # transformers and NVIDIA's remote code build it so, and checkpoints hold it so.
        self.shared_experts = (MLP(cfg.hidden_size, cfg.shared_expert_size, cfg.mlp_bias)
                               if cfg.n_shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        # A long prompt goes through in slices of tokens: each token's routing and sum are its own, and the
        # grouped route's buffers ([T*k, H] rows and their weighted copy in the router dtype: 1 GB in fp64
        # for 8k tokens of Nano) stay bounded.
        parts = [self._routed(flat[i:i + MOE_SLICE_TOKENS]) for i in range(0, max(flat.shape[0], 1), MOE_SLICE_TOKENS)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)

    def _routed(self, flat: Tensor) -> Tensor:
        """The routed experts' weighted sum for tokens flat [T, H] → [T, H] in flat's dtype."""
        weights, experts = self.gate(flat, self.router_dtype)  # [T, k]
        k = experts.shape[1]
        # Sort the T*k (token, slot) assignments by expert so each expert sees one contiguous slice; where
        # each slice ends comes from the sorted ids on the device (no bincount: on CUDA it syncs for its max).
        chosen, order = experts.flatten().sort(stable=True)
        ends = torch.searchsorted(chosen, _expert_ids(self.experts.n, flat.device), right=True, out_int32=True)
        w = weights.flatten()[order]  # each row's weight, in the sorted order
        if flat.shape[0] == 1:
            # One token (a batch-1 decode step): its k rows are that token, and the weighted sum is one [1, k]
            # × [k, H] product in the router dtype. Four kernels instead of the general route's nine.
            y = self.experts(flat.expand(k, -1).contiguous(), ends)
            return (w[None] @ y.to(weights.dtype)).to(flat.dtype)
        tokens = order // k
        y = self.experts(flat[tokens], ends)
        out = torch.zeros(flat.shape, dtype=weights.dtype, device=flat.device)
        weighted = y.to(out.dtype)
        # In place without autograd (y is this call's own temporary): one [T*k, H] router-dtype buffer, not two.
        weighted = weighted * w[:, None] if torch.is_grad_enabled() else weighted.mul_(w[:, None])
        out.index_add_(0, tokens, weighted)
        return out.to(flat.dtype)
