"""Chunked SSD scan vs the token-by-token recurrence on CPU, side by side from one run.

Nano's Mamba-2 layer has 64 heads × 64 head_dim, 8 groups, state 128, chunk 128; this keeps chunk 128,
head_dim 64 and state 128 but uses 16 heads / 2 groups so that the sequential baseline finishes in seconds.

    python benchmarks/ssd.py [--length 2048] [--heads 16] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from twotower_cli.ops.ssd import ssd_chunked, ssd_sequential


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--state", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
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

    with torch.inference_mode():
        y_seq, _ = ssd_sequential(x, dt, A, B, C, args.chunk)
        y_chk, _ = ssd_chunked(x, dt, A, B, C, args.chunk)
        diff = (y_seq - y_chk).abs().max().item()
        t_seq = best_time(lambda: ssd_sequential(x, dt, A, B, C, args.chunk), args.repeats)
        t_chk = best_time(lambda: ssd_chunked(x, dt, A, B, C, args.chunk), args.repeats)
    print(f"SSD scan L={L} heads={h} head_dim={p} groups={G} state={n} chunk={args.chunk} "
          f"threads={torch.get_num_threads()}: sequential {t_seq * 1e3:.1f} ms, chunked {t_chk * 1e3:.1f} ms, "
          f"speed-up {t_seq / t_chk:.1f}x (max |diff| {diff:.2e})")


if __name__ == "__main__":
    main()
