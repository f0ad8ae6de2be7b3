"""Attention through SDPA with grouped keys/values: the previous dispatch vs `Attention._sdpa`, one run.

Nano's attention layers have 32 query heads on 2 key/value heads (head_dim 128). SDPA takes grouped keys and
values (`enable_gqa`) only in flash attention, which has no mask; the previous code passed `enable_gqa`
with an additive mask too, which on CUDA runs SDPA's math backend ([b, h, L, T] fp32 scores). `_sdpa` now
packs the query heads onto the key/value heads (short L) or expands the keys/values (long L) so that the
memory-efficient kernel runs. Cases, as the towers make them:

    commit        the context tower extends its cache by a committed block (16 tokens after a long context)
    denoise pads  the denoiser's block over a batch of left-padded prompts
    prefill pads  a batch of left-padded prompts, prefilled
    train block   the training forward + backward: every block at once, block mask over context ‖ noisy
    decode        one token, no mask (flash attention with grouped keys/values either way: a control)

Columns: best of --rounds (interleaved) in ms; on CUDA also the peak memory each call allocates and the
backend class it gets (`fused`: it runs with SDPA restricted to flash / memory-efficient / cuDNN attention;
`math`: SDPA then has no kernel for it).

    python benchmarks/attention.py                 # CUDA, bf16, context 4096
    python benchmarks/attention.py --context 512   # CPU (there SDPA never takes the math backend: a check of
                                                   # the script and the cost of packing, not the GPU result)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from twotower_cli.config import NemotronHConfig
from twotower_cli.model.attention import Attention, causal_mask
from twotower_cli.train import block_attention_mask

H, KV, D = 32, 2, 128


def previous_sdpa(q, k, v, t_past: int, causal: bool, mask):
    """The dispatch before this change: grouped keys/values and an additive mask in one SDPA call."""
    L = q.shape[2]
    is_causal = False
    if mask is None and causal:
        if t_past == 0 and L > 1:
            is_causal = True
        elif L > 1:
            mask = causal_mask(L, t_past, q.device)
    attn = None
    if mask is not None:
        attn = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, is_causal=is_causal, scale=1 / math.sqrt(D),
                                          enable_gqa=True)


def cases(T: int, device: torch.device, dtype: torch.dtype):
    """(name, b, L, t_past, causal, mask, backward)."""
    def pads(b: int, n: int) -> torch.Tensor:  # sequence i starts i·n/8 tokens late
        valid = torch.ones(b, n, dtype=torch.bool, device=device)
        for i in range(b):
            valid[i, :i * n // 8] = False
        return valid

    Lt = T // 2
    pre = pads(2, T)
    return [
        ("commit 16", 1, 16, T, True, None, False),
        ("denoise 16, 4 pads", 4, 16, T, False, pads(4, T + 16)[:, None, None, :].expand(4, 1, 16, T + 16), False),
        ("prefill, 2 pads", 2, T, 0, True, causal_mask(T, 0, device)[None, None] & pre[:, None, None, :], False),
        (f"train block {Lt}", 1, Lt, Lt, False, block_attention_mask(Lt, 16, device)[None, None], True),
        ("decode 1", 1, 1, T, True, None, False),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096, help="tokens before the block (prefill length)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    run(torch.device(args.device), args.context, args.rounds)


def run(device: torch.device, T: int, rounds: int = 5) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = NemotronHConfig.build("*", hidden_size=512, vocab_size=64, num_attention_heads=H, num_key_value_heads=KV,
                                head_dim=D)
    att = Attention(cfg)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"attention, {H} query heads on {KV} key/value heads × {D} · {dtype} · {name} · context {T}")
    print(f"{'case':24}{'previous ms':>13}{'_sdpa ms':>11}{'speed-up':>10}"
          + (f"{'previous MiB':>14}{'_sdpa MiB':>11}{'previous':>10}{'_sdpa':>8}" if cuda else ""))
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, b, L, t_past, causal, mask, backward in cases(T, device, dtype):
        q, k, v = (torch.randn(*shape, generator=g).to(device, dtype)
                   for shape in ((b, H, L, D), (b, KV, t_past + L, D), (b, KV, t_past + L, D)))
        q.requires_grad_(backward)
        args = (q, k, v, t_past, causal, mask)
        variants = [partial(step, previous_sdpa, args, backward),
                    partial(step, partial(Attention._sdpa, att), args, backward)]
        best, peak = [math.inf, math.inf], [0.0, 0.0]
        for i, fn in enumerate(variants):  # warm-up, and the peak each allocates beyond its inputs
            if cuda:
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            fn()
            if cuda:
                torch.cuda.synchronize(device)
                peak[i] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        for _ in range(rounds):
            for i, fn in enumerate(variants):
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize(device)
                best[i] = min(best[i], time.perf_counter() - t0)
        line = f"{name:24}{best[0] * 1e3:13.2f}{best[1] * 1e3:11.2f}{best[0] / best[1]:9.2f}×"
        if cuda:
            line += f"{peak[0]:14.0f}{peak[1]:11.0f}" + "".join(f"{backend_of(fn):>{w}}"
                                                              for fn, w in zip(variants, (10, 8), strict=True))
        print(line, flush=True)
    growing_keys(att, device, dtype, T, rounds)


def growing_keys(att: Attention, device: torch.device, dtype: torch.dtype, T: int, rounds: int,
                 steps: int = 32) -> None:
    """What the table above cannot show (it repeats each shape): decode as the context tower runs it, the
    keys one longer at every step, so every call has a shape SDPA has not seen. SDPA's default backends
    (cuDNN first on sm90 with torch 2.11, which builds a graph per new shape) vs `sdpa_backends` (flash /
    memory-efficient / math), the same `_sdpa` call; ms per step, best of `rounds`, each round on key lengths
    neither side has used."""
    from twotower_cli.model.attention import sdpa_backends

    g = torch.Generator(device="cpu").manual_seed(1)
    total = T + 2 * rounds * steps
    q = torch.randn(1, H, 1, D, generator=g).to(device, dtype)
    k, v = (torch.randn(1, KV, total, D, generator=g).to(device, dtype) for _ in range(2))

    def decode(start: int, restrict: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for t in range(start, start + steps):
            with sdpa_backends(device) if restrict else contextlib.nullcontext():
                att._sdpa(q, k[:, :, :t], v[:, :, :t], t - 1, True, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / steps

    best = [math.inf, math.inf]
    for r in range(rounds):
        for i, restrict in enumerate((False, True)):
            best[i] = min(best[i], decode(T + (2 * r + i) * steps, restrict))
    print(f"decode, keys growing {T}→ one per step ({steps} steps): default backends {best[0] * 1e3:.3f} ms · "
          f"sdpa_backends {best[1] * 1e3:.3f} ms per step ({best[0] / best[1]:.2f}×)", flush=True)


def backend_of(fn: Callable[[], None]) -> str:
    """'fused' if the call runs with SDPA restricted to flash / memory-efficient / cuDNN attention, 'math' if
    SDPA then finds no kernel (so it runs its math backend when allowed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            fn()
    except RuntimeError as e:
        if "No available kernel" not in str(e):
            raise
        return "math"
    return "fused"


def step(fn: Callable, args: tuple, backward: bool) -> None:
    out = fn(*args)
    if backward:
        out.float().sum().backward()
        args[0].grad = None


if __name__ == "__main__":
    main()
