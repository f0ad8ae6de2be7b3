"""Chunked SSD scan vs the token-by-token recurrence on CPU, side by side from one run.

Nano's Mamba-2 layer has 64 heads × 64 head_dim, 8 groups, state 128, chunk 128; this keeps head_dim 64,
state 128 and chunk_size 128 but uses 16 heads / 2 groups so that the sequential baseline finishes in
seconds. On CPU `ssd_chunked` scans in chunks of at most `ops.ssd.CPU_CHUNK` (64) steps whatever the
chunk_size (same function, faster there); the last line forces the model's chunk_size instead, to show
what that choice is worth.

The runs are interleaved (one of each per round) and each variant reports its fastest round: on a shared
machine that is the estimate least disturbed by neighbours, and a slow spell hits every variant alike.

    python benchmarks/ssd.py [--length 2048] [--heads 16] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from twotower_cli.ops import ssd


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--state", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=128, help="the model's chunk_size")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    L, h, p, G, n = args.length, args.heads, args.head_dim, args.groups, args.state
    x = torch.randn(1, L, h, p, generator=g)
    dt = torch.rand(1, L, h, generator=g) * 0.1
    A = -torch.rand(h, generator=g) * 15 - 1
    B = torch.randn(1, L, G, n, generator=g)
    C = torch.randn(1, L, G, n, generator=g)
    cpu_chunk = min(args.chunk, ssd.CPU_CHUNK)

    def at_model_chunk():
        saved, ssd.CPU_CHUNK = ssd.CPU_CHUNK, args.chunk
        try:
            return ssd.ssd_chunked(x, dt, A, B, C, args.chunk)
        finally:
            ssd.CPU_CHUNK = saved

    variants = {
        "sequential": lambda: ssd.ssd_sequential(x, dt, A, B, C, args.chunk),
        f"chunked (as run: chunks of {cpu_chunk})": lambda: ssd.ssd_chunked(x, dt, A, B, C, args.chunk),
        f"chunked, forced to chunks of {args.chunk}": at_model_chunk,
    }
    best = dict.fromkeys(variants, float("inf"))
    with torch.inference_mode():
        y_ref, _ = variants["sequential"]()
        diffs = {name: (fn()[0] - y_ref).abs().max().item() for name, fn in variants.items()}  # also warms up
        for _ in range(args.rounds):
            for name, fn in variants.items():
                best[name] = min(best[name], timed(fn))

    base = best["sequential"]
    print(f"SSD scan, L={L}, {h} heads × {p}, {G} groups, state {n}, chunk_size {args.chunk}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds:")
    for name, t in best.items():
        tail = "" if name == "sequential" else f"   {base / t:5.1f}x   max |diff| {diffs[name]:.2e}"
        print(f"  {name:<36} {t * 1e3:8.1f} ms{tail}")


if __name__ == "__main__":
    main()
