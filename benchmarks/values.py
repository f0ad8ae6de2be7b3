"""`twotower inspect --values` (`scan_values`: the NaN / Inf count from the bits, 16 MB `pread`s, numpy) against
the obvious way (each tensor through safetensors' `safe_open` into torch, then `isnan` / `isinf` on it),
on the same checkpoint of random bf16 tensors with a few NaN and Inf planted, read from the page cache
(both are read once before timing). Prints GB/s for each, best of --rounds interleaved rounds, and checks that
they count the same.

    python benchmarks/values.py [--dir /tmp/twotower-values-bench] [--gb 1.0] [--rounds 3]

With --gb 2 (the default 1 GB shards: 2 of them) the threads have two shards to share.
"""

import argparse
import time
from pathlib import Path

import torch


def build(folder: Path, gb: float) -> dict[str, tuple[int, int]]:
    """A checkpoint of ~`gb` GB of bf16 [4096, 4096] tensors in 1 GB shards; returns the planted counts."""
    from twotower_cli.checkpoint import save_tensors

    n = max(1, round(gb * 1e9 / (4096 * 4096 * 2)))
    g = torch.Generator().manual_seed(0)
    tensors, planted = {}, {}
    for i in range(n):
        t = torch.randn(4096, 4096, generator=g).to(torch.bfloat16)
        if i % 3 == 1:
            t.view(-1)[torch.randint(0, t.numel(), (i,), generator=g)] = float("nan")
            t.view(-1)[-1] = float("inf")
        tensors[f"w.{i}"] = t
    for name, t in tensors.items():
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            planted[name] = (nan, inf)
    if not (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(folder, tensors, max_shard_size="1GB")
    return planted


def with_torch(ckpt) -> dict[str, tuple[int, int]]:
    from safetensors import safe_open

    found = {}
    for file in ckpt.files:
        with safe_open(str(ckpt.path(file)), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_tensor(name)
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                if nan or inf:
                    found[name] = (nan, inf)
    return found


def with_scan(ckpt, workers: int | None = None) -> dict[str, tuple[int, int]]:
    from twotower_cli.inspect import scan_values

    return {k: (v["nan"], v["inf"]) for k, v in scan_values(ckpt, workers=workers)["nonfinite"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/twotower-values-bench")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from twotower_cli.checkpoint import open_checkpoint

    folder = Path(args.dir)
    planted = build(folder, args.gb)
    ckpt = open_checkpoint(folder)
    size = ckpt.total_bytes
    print(f"{len(ckpt.tensors)} bf16 tensors, {size / 1e9:.2f} GB in {len(ckpt.files)} shards at {folder}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    assert with_torch(ckpt) == planted and with_scan(ckpt) == planted  # the same counts (and a warm page cache)
    runs = {"safe_open + torch.isnan/isinf (baseline)": with_torch,
            "scan_values, one thread": lambda c: with_scan(c, workers=1),
            "scan_values, a thread per shard (inspect --values)": with_scan}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for label, fn in runs.items():
            t0 = time.perf_counter()
            fn(ckpt)
            best[label] = min(best[label], time.perf_counter() - t0)
    base = next(iter(best.values()))
    for label, s in best.items():
        print(f"{label:<52} {s * 1000:8.1f} ms  {size / s / 1e9:6.2f} GB/s  {base / s:5.2f}×")


if __name__ == "__main__":
    main()
