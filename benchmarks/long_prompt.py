"""A long prompt's prefill through the CPU attention path: whole score matrix (before) vs query row chunks.
With --sdpa, the SDPA path (CUDA's, forced on CPU) after a cached past: whole additive mask vs row chunks.

The explicit CPU path (`Attention._attend` without SDPA) built the [b, h, L, L] fp32 scores of a prefill at
once, and held them about three times (scores, the masked copy, the softmax): a 27k-token prompt of the tiny
model was OOM-killed on a 24 GB machine. It now takes the queries in chunks whose scores stay under
`attention.SCORE_ELEMENTS`. Each variant and length runs in a fresh process (peak RSS is per process): one
attention layer of the chosen shape, a causal prefill of L tokens, time and peak RSS, and the largest
difference between the two outputs.

    python benchmarks/long_prompt.py                       # tiny's attention (4 heads on 2, head_dim 48)
    python benchmarks/long_prompt.py --lengths 4096,8192 --heads 32 --kv-heads 2 --head-dim 128 --hidden 2688
    python benchmarks/long_prompt.py --sdpa --past 1024 --lengths 16384,24576   # the SDPA path's mask
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
import torch
from twotower_cli.config import NemotronHConfig
from twotower_cli.model import attention
from twotower_cli.model.cache import KVCache
from twotower_cli.model.init import init_nemotron_h
from twotower_cli.ops import kernels

L, heads, kv, head_dim, hidden, whole, out_path, threads, sdpa, past_len = json.loads(sys.argv[1])
torch.set_num_threads(threads)
if whole:  # the paths before the change: one chunk, the whole score matrix / additive mask
    attention.SCORE_ELEMENTS = attention.MASK_ELEMENTS = 1 << 62
cfg = NemotronHConfig.build("*", hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                            head_dim=head_dim, vocab_size=16)
layer = attention.Attention(cfg)
init_nemotron_h(layer, torch.Generator().manual_seed(0), std=0.02)
x = torch.randn(1, L, hidden, generator=torch.Generator().manual_seed(1))
with torch.no_grad(), kernels.force(sdpa=bool(sdpa)):
    past = None
    if past_len:
        _, k, v = layer(torch.randn(1, past_len, hidden, generator=torch.Generator().manual_seed(2)))
        past = KVCache(k, v)
    t0 = time.perf_counter()
    out, _, _ = layer(x, past)
    seconds = time.perf_counter() - t0
torch.save(out, out_path)
print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(L: int, args: argparse.Namespace, whole: bool, out_path: str) -> dict:
    spec = json.dumps([L, args.heads, args.kv_heads, args.head_dim, args.hidden, whole, out_path, args.threads,
                       args.sdpa, args.past])
    env = {**os.environ, "TWOTOWER_KERNELS": "torch"}
    done = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        why = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip().splitlines()[-1]
        return {"error": why}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2048,4096,8192,12288")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=48)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sdpa", action="store_true", help="the SDPA path (forced on CPU) instead of the explicit one")
    p.add_argument("--past", type=int, default=0, help="tokens already cached before the prompt (not timed)")
    args = p.parse_args()
    import torch

    from twotower_cli.model import attention

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; attention {args.heads} heads on "
          f"{args.kv_heads}, head_dim {args.head_dim}; past {args.past}; "
          + (f"SDPA path, masks of at most {attention.MASK_ELEMENTS} entries" if args.sdpa else
             f"explicit path, chunks of at most {attention.SCORE_ELEMENTS} scores"))
    print(f"{'L':>7} | {'whole s':>8} {'whole MiB':>10} | {'chunked s':>9} {'chunked MiB':>11} | {'speed':>6} "
          f"{'memory':>7} | max |diff|")
    with tempfile.TemporaryDirectory() as tmp:
        for L in (int(n) for n in args.lengths.split(",")):
            paths = [os.path.join(tmp, f"{name}-{L}.pt") for name in ("whole", "chunked")]
            before, after = run(L, args, True, paths[0]), run(L, args, False, paths[1])
            if "error" in before or "error" in after:
                print(f"{L:>7} | whole: {before.get('error', 'ok')} | chunked: {after.get('error', 'ok')}")
                continue
            diff = (torch.load(paths[0]) - torch.load(paths[1])).abs().max().item()
            print(f"{L:>7} | {before['seconds']:>8.2f} {before['peak_mib']:>10.0f} | {after['seconds']:>9.2f} "
                  f"{after['peak_mib']:>11.0f} | {before['seconds'] / after['seconds']:>5.2f}× "
                  f"{before['peak_mib'] / after['peak_mib']:>6.2f}× | {diff:.2e}")


if __name__ == "__main__":
    main()
