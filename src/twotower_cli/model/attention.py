"""Grouped-query attention of NemotronH (`*` layers, spec §2): no positional encoding (no RoPE),
projection biases only if `attention_bias`, scale 1/sqrt(head_dim), softmax in fp32.

    forward(x [b, L, H], past: KVCache | None, causal=True, mask [b|1, 1, L, T_past + L] bool | None,
            append=False) -> (out [b, L, H], k_new [b, kv, L, d], v_new [b, kv, L, d])

Queries attend over concat(past.k, k_new). `past` is not modified unless `append` (the context tower's
cache update; the denoiser's block attention never appends): then past.k / past.v become that
concatenation, the tensors attention used, rather than being concatenated a second time. `mask` (True = may
attend) overrides `causal` when given; causal means query i sees keys 0 .. T_past + i.

On CPU the scores, softmax and weighted sum are explicit fp32 math rather than F.scaled_dot_product_attention:
the result is the same on every backend, which the parity tests rely on, and masked entries use the dtype's
finite minimum so that a fully masked row (a left-pad query) gives finite values, not NaN. On CUDA
(`ops.kernels.use_sdpa`; TWOTOWER_KERNELS=torch keeps the explicit math) the same attention goes through
SDPA: no mask (the denoiser's block, one-token decode) or a fresh causal prefill (`is_causal`) use flash
attention with grouped keys/values; any other mask becomes an additive mask (`MASKED`), which gives the
explicit path's numbers, fully masked rows included. Where this torch runs grouped keys/values with a mask
in flash or memory-efficient attention (`gqa_fused`, probed once) that call is used as it is; elsewhere the
query heads are packed or the keys/values expanded so that the memory-efficient kernel runs (never SDPA's
math backend: see `_sdpa`). Never cuDNN attention either (`sdpa_backends`).
tests/test_kernels.py forces the SDPA path on CPU and checks it against the explicit one.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower_cli.config import NemotronHConfig
from twotower_cli.model.cache import KVCache
from twotower_cli.ops import kernels

# What SDPA adds to masked scores. Not the dtype's minimum: the memory-efficient CUDA kernel multiplies
# scores by log2(e) before taking the row maximum, which turns -3.4e38 into -inf, and a fully masked row (a
# left-pad query) then comes out 0 or NaN (torch < 2.5) instead of the explicit path's finite average; a
# NaN there reaches the real tokens through the Mamba layers' conv (NaN · 0 = NaN). -1e30 · log2(e) stays
# finite in fp32 and still rounds every score away (fp16, which cannot hold it, uses its minimum).
MASKED = -1e30


def causal_mask(L: int, t_past: int, device: torch.device | str | None = None) -> Tensor:
    """[L, t_past + L] bool: query i (absolute position t_past + i) sees keys 0 .. t_past + i."""
    q = torch.arange(L, device=device)[:, None] + t_past
    k = torch.arange(t_past + L, device=device)[None, :]
    return k <= q


MASK_ELEMENTS = 1 << 28  # additive mask entries of one SDPA call at most (512 MiB of bf16; `_sdpa_rows`)
SCORE_ELEMENTS = 1 << 26  # fp32 scores of one chunk of queries on the explicit path (256 MiB; `_attend`)

_GQA_FUSED: dict[tuple[str, torch.dtype], bool] = {}


def sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA backends the towers' attention may use on `device`: on CUDA flash and memory-efficient
    attention, the math backend as the last resort, and not cuDNN attention. torch 2.11 with its bundled cuDNN
    prefers cuDNN on sm90 (H100, H200), and cuDNN builds an execution graph for every new shape: the context
    tower's keys grow by one each decode step and by a block each commit, so every step paid a graph build.
    On an H100 (scripts/gpu_check.py, benchmarks/README) a decode step took 44.6 ms eager against 1.16 ms
    as a replayed CUDA graph and ~7 ms of host time when its shapes had been seen before, and kernel-path
    decode ran at 0.11x the explicit-attention path. Off CUDA: no change (a null context)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def gqa_fused(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA on this CUDA device runs grouped keys/values (`enable_gqa`) with an additive mask in a fused
    kernel (flash / memory-efficient; cuDNN is never used, `sdpa_backends`) for `dtype`, rather than its math
    backend. Probed once per device and dtype with a tiny call restricted to those backends; where it runs,
    the direct call replaces packing or expanding (`_sdpa`). False off CUDA: the CPU path keeps its numbers."""
    key = (str(device), dtype)
    if key not in _GQA_FUSED:
        ok = False
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            q = torch.zeros(1, 4, 2, 64, device=device, dtype=dtype)
            kv = torch.zeros(1, 2, 3, 64, device=device, dtype=dtype)
            mask = torch.zeros(1, 1, 2, 3, device=device, dtype=dtype)
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, enable_gqa=True)
                ok = True
            except RuntimeError:  # "No available kernel": only the math backend takes it
                ok = False
        _GQA_FUSED[key] = ok
    return _GQA_FUSED[key]


class Attention(nn.Module):
    def __init__(self, cfg: NemotronHConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.hidden_size, bias=bias)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [b, h, L, d], k_new / v_new [b, kv, L, d]."""
        b, L, _ = x.shape
        q = self.q_proj(x).view(b, L, self.n_heads, self.head_dim).transpose(1, 2)
        k_new = self.k_proj(x).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        v_new = self.v_proj(x).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k_new, v_new

    def forward(self, x: Tensor, past: KVCache | None = None, causal: bool = True,
                mask: Tensor | None = None, append: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        q, k_new, v_new = self._project(x)
        if past is not None and past.length:
            k = torch.cat([past.k.to(k_new.dtype), k_new], dim=2)
            v = torch.cat([past.v.to(v_new.dtype), v_new], dim=2)
        else:
            k, v = k_new, v_new
        if append and past is not None:  # contiguous: an empty past's are the projection's transposed views, of
            # another stride than torch.cat's, which --compile then compiled every attention layer again for
            past.k, past.v = k.to(past.k.dtype).contiguous(), v.to(past.v.dtype).contiguous()
        return self._attend(x, q, k, v, causal, mask), k_new, v_new

    def step_into(self, x: Tensor, k_buf: Tensor, v_buf: Tensor, cols: Tensor, mask: Tensor) -> Tensor:
        """L new tokens per row over key/value buffers of a fixed size, for a context step captured in a CUDA
        graph (`towers.TowerBackend`, `--cuda-graphs`): x [b, L, H]; k_buf / v_buf [b, kv, C, d] hold the
        past at the columns before `cols`; cols [L] long, the new tokens' columns (on the device: the graph
        reads them at replay); mask [b|1, 1, L, C] bool, what each new token may attend to (its row's valid
        keys up to its own column). Writes the new keys and values at `cols` and attends over all C columns
        under `mask`: the same attention as `forward(x, past)` over the filled columns, with shapes that do
        not change from step to step."""
        q, k_new, v_new = self._project(x)
        k_buf.index_copy_(2, cols, k_new.to(k_buf.dtype))
        v_buf.index_copy_(2, cols, v_new.to(v_buf.dtype))
        return self._attend(x, q, k_buf.to(k_new.dtype), v_buf.to(v_new.dtype), False, mask)

    def _attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None) -> Tensor:
        """The output projection of q's attention over k / v [b, kv, T, d] (the last L keys the queries' own)."""
        b, L, _ = x.shape
        t_past = k.shape[2] - L
        if kernels.use_sdpa(x):
            # Inside a torch.compile trace the flags are the caller's: TowerBackend sets them around its steps.
            with sdpa_backends(x.device) if not torch.compiler.is_compiling() else contextlib.nullcontext():
                out = self._sdpa_rows(q, k, v, t_past, causal, mask)
            return self.o_proj(out.transpose(1, 2).reshape(b, L, self.n_heads * self.head_dim))

        # GQA: query head j reads kv head j // (heads / kv), as repeat_kv in the reference does.
        rep = self.n_heads // self.n_kv
        k = k.float().repeat_interleave(rep, dim=1)
        v = v.float().repeat_interleave(rep, dim=1)
        q = q.float()
        # Queries in row chunks whose [b, h, rows, T] scores stay under SCORE_ELEMENTS: a long prompt's prefill
        # would otherwise hold its whole score matrix three times over (scores, masked, softmax: 35 GB for 27k
        # tokens at 4 heads). Each row's softmax is its own, so chunks change nothing but the memory.
        rows = max(1, SCORE_ELEMENTS // max(1, b * self.n_heads * k.shape[2]))
        if L <= rows:
            out = self._explicit(q, k, v, t_past, causal, mask)
        else:
            out = torch.cat([self._explicit(q[:, :, a:a + rows], k, v, t_past + a, causal,
                                            None if mask is None else mask[..., a:a + rows, :])
                             for a in range(0, L, rows)], dim=2)
        out = out.transpose(1, 2).reshape(b, L, self.n_heads * self.head_dim).to(x.dtype)
        return self.o_proj(out)

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, t_past: int, causal: bool, mask: Tensor | None) -> Tensor:
        """fp32 softmax(q kᵀ / sqrt(d)) v of queries q [b, h, L, d] at positions t_past .. t_past + L - 1 over
        the first t_past + L of keys / values k, v [b, h, T, d] (T ≥ t_past + L: a chunk's later keys are masked
        by `causal`, or by `mask` [b|1, 1, L, T])."""
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [b, h, L, T]
        if mask is None and causal:
            mask = causal_mask(q.shape[2], t_past, q.device)
            if mask.shape[1] < k.shape[2]:  # a chunk before the last: the keys past its last query are not seen
                mask = F.pad(mask, (0, k.shape[2] - mask.shape[1]))
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1) @ v  # [b, h, L, d]

    def _sdpa_rows(self, q: Tensor, k: Tensor, v: Tensor, t_past: int, causal: bool, mask: Tensor | None) -> Tensor:
        """`_sdpa`, with the queries in row chunks where it would build an additive mask of more than
        MASK_ELEMENTS (a long left-padded prefill, or long new text after a cached past: 2 GiB of bf16 at 32k x
        32k); a causal chunk reads the keys up to its last query only. Calls without a mask (flash attention:
        the block, decode, a fresh causal prefill) go through whole."""
        L, T = q.shape[2], k.shape[2]
        masked = mask is not None or (causal and L > 1 and t_past > 0)
        rows = max(1, MASK_ELEMENTS // max(1, (1 if mask is None else mask.shape[0]) * T))
        if not masked or L <= rows:
            return self._sdpa(q, k, v, t_past, causal, mask)
        parts = []
        for a in range(0, L, rows):
            n = min(rows, L - a)
            if mask is None:  # causal after a past: this chunk sees the keys up to its own last query
                end = t_past + a + n
                parts.append(self._sdpa(q[:, :, a:a + n], k[:, :, :end], v[:, :, :end], t_past + a, True, None))
            else:
                parts.append(self._sdpa(q[:, :, a:a + n], k, v, t_past, causal, mask[..., a:a + n, :]))
        return torch.cat(parts, dim=2)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, t_past: int, causal: bool, mask: Tensor | None) -> Tensor:
        """The same attention through F.scaled_dot_product_attention; q [b, h, L, d], k/v [b, kv, T, d].

        Grouped keys/values (kv < h) reach a fused kernel only through flash attention, which reads them
        natively but takes no mask and no fp32: SDPA with `enable_gqa` and a mask (a context block extending
        the cache, left pads, the training block mask) or in fp32 runs its math backend, [b, h, L, T] fp32
        scores (8 GiB a sequence for an 8k padded prefill at Nano's 32 heads). So `enable_gqa` is passed only
        where flash can take it; elsewhere the head counts are made equal first, which lets the
        memory-efficient kernel run, by the cheaper of
          pack:   the rep = h/kv query heads that share a key/value head become one head of rep·L queries
                  ([b, kv, rep·L, d], the mask tiled rep times along the queries); keys/values not copied;
          expand: keys/values repeated to h heads; for long L (prefill) and top-left causal prefill.
        """
        b, h, L, d = q.shape
        kv = k.shape[1]
        rep = h // kv
        is_causal = False
        if mask is None and causal and L > 1:
            if t_past == 0:
                is_causal = True  # SDPA's is_causal is top-left aligned: right only without a past
            else:
                mask = causal_mask(L, t_past, q.device)[None, None]
        attn_mask = None
        if mask is not None:
            attn_mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~mask, max(torch.finfo(q.dtype).min, MASKED))
        k, v = k.to(q.dtype), v.to(q.dtype)
        scale = 1.0 / math.sqrt(d)
        if (rep == 1 or (attn_mask is None and q.dtype in (torch.float16, torch.bfloat16))
                or (q.is_cuda and gqa_fused(q.device, q.dtype))):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=rep > 1)
        # pack when the tiled mask has no more elements than the copied keys/values would
        mask_rows = 0 if attn_mask is None else attn_mask.shape[0] * rep * L
        if not is_causal and mask_rows <= 2 * b * (h - kv) * d:
            if attn_mask is not None:
                attn_mask = attn_mask.repeat(1, 1, rep, 1)  # [b|1, 1, rep·L, T]: row r·L + i is query i
            out = F.scaled_dot_product_attention(q.reshape(b, kv, rep * L, d), k, v, attn_mask=attn_mask,
                                                 scale=scale)
            return out.reshape(b, h, L, d)  # CUDA kernels may return [b, kv, rep·L, d] with L-major strides
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                                              attn_mask=attn_mask, is_causal=is_causal, scale=scale)
