"""`twotower split` against its floor: two `cp` of the same bytes (the output is twice the input).

Builds a ~1.5 GB random bf16 NemotronH-shaped checkpoint (5 shards), then, --repeats times in
rotating order, each command after deleting the outputs and `sync` (so none pays for another's
writeback; the source stays in the page cache for all), times:
  floor   `cp -r SRC A && cp -r SRC B`
  floor+sync  the same, then `sync` of the copies' files: the bytes on the disk, as split leaves its
          output (it fsyncs every file and folder before the output takes its name, so that a power loss
          after a `--force` replacement never finds the old output gone and the new one unwritten)
  split   the `twotower split SRC -o OUT` process (interpreter start and command imports included)
  library `execute(plan_split(...))` in a fresh process, i.e. the split work without CLI start-up
and prints medians, ratios to both floors (goal ≤ 1.1× the floor; floor+sync is the like-for-like one)
and each process's peak RSS (goal < 300 MB).

    python benchmarks/split.py [--dir /tmp/twotower-split-bench] [--repeats 3] [--gb 1.5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from twotower_cli.checkpoint import assign_shards, encode_header, shard_names, write_index
from twotower_cli.config import NemotronHConfig
from twotower_cli.layout import nemotron_h_shapes

# NemotronH-shaped (Nano's layer mix, smaller widths): ~0.70 B parameters, 1.4 GB in bf16 at --gb 1.5.
BENCH_CONFIG = dict(
    hidden_size=1024, vocab_size=32000, num_attention_heads=16, num_key_value_heads=2, head_dim=64,
    mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=64, n_groups=4, conv_kernel=4, chunk_size=128,
    n_routed_experts=64, num_experts_per_tok=4, moe_intermediate_size=640, moe_shared_expert_intermediate_size=1280,
    intermediate_size=2048, tie_word_embeddings=False,
)
PATTERN = "MEM*EMEMEM*EMEME"


def build_source(folder: Path, gb: float) -> int:
    """Random bf16 bytes in the NemotronH layout; returns the tensor bytes. Reused when present."""
    import numpy as np

    experts = max(8, round(BENCH_CONFIG["n_routed_experts"] * gb / 1.5))
    cfg = NemotronHConfig.build(PATTERN, **{**BENCH_CONFIG, "n_routed_experts": experts})
    shapes = nemotron_h_shapes(cfg)
    sizes = [(n, 2 * _numel(s)) for n, s in shapes.items()]
    total = sum(b for _, b in sizes)
    if (folder / "config.json").is_file():
        return total
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    groups = assign_shards(sizes, total // 4 + 1)
    nbytes = dict(sizes)
    weight_map = {}
    for file, group in zip(shard_names(len(groups)), groups, strict=True):
        with open(folder / file, "wb") as f:
            f.write(encode_header([(n, "BF16", shapes[n], nbytes[n]) for n in group], {"format": "pt"}))
            for n in group:
                left = nbytes[n]
                while left:
                    step = min(left, 64 << 20)
                    f.write(rng.bytes(step))
                    left -= step
        weight_map.update({n: file for n in group})
    write_index(folder, weight_map, total)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process. Linux folds the RSS of the forking parent
    into the child's ru_maxrss, so the parent stays lean (the source is built in its own process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024


def _clean(root: Path) -> None:
    """Remove outputs and flush dirty pages, so no run pays for an earlier run's writeback."""
    for d in ("cp-a", "cp-b", "out-cli", "out-lib"):
        shutil.rmtree(root / d, ignore_errors=True)
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/twotower-split-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gb", type=float, default=1.5)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    src = root / "src"
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    if free < 6 * args.gb * 1e9:
        raise SystemExit(f"need about {6 * args.gb:.0f} GB free in {root}, have {free / 1e9:.1f} GB")
    t0 = time.perf_counter()
    if args.build_only:
        build_source(src, args.gb)
        return
    subprocess.run([sys.executable, __file__, "--build-only", "--dir", args.dir, "--gb", str(args.gb)], check=True)
    total = build_source(src, args.gb)  # reused: only computes the size
    print(f"source {src}: {total / 1e9:.2f} GB of bf16 tensors ({time.perf_counter() - t0:.1f} s to build or reuse)")

    exe = shutil.which("twotower") or str(Path(sys.executable).parent / "twotower")
    lib = ("from twotower_cli.split import execute, load_source, plan_split; import sys; "
           "execute(plan_split(*load_source(sys.argv[1])), sys.argv[2], force=True)")
    commands = {
        "floor": ["sh", "-c", f"cp -r '{src}' '{root / 'cp-a'}' && cp -r '{src}' '{root / 'cp-b'}'"],
        "floor+sync": ["sh", "-c", f"cp -r '{src}' '{root / 'cp-a'}' && cp -r '{src}' '{root / 'cp-b'}' && "
                                   f"sync '{root / 'cp-a'}'/* '{root / 'cp-b'}'/* '{root / 'cp-a'}' '{root / 'cp-b'}'"],
        "split": [exe, "split", str(src), "-o", str(root / "out-cli"), "--force"],
        "library": [sys.executable, "-c", lib, str(src), str(root / "out-lib")],
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for r in range(args.repeats):
        names = list(commands)
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order between repeats
            _clean(root)  # every command starts from the same state: outputs gone, nothing dirty
            runs[name].append(timed(commands[name]))
    _clean(root)

    floor = statistics.median(t for t, _ in runs["floor"])
    synced = statistics.median(t for t, _ in runs["floor+sync"])
    print(f"{'':12}{'median s':>10}{'× floor':>10}{'× +sync':>10}{'GB/s out':>10}{'peak RSS MB':>13}")
    for name, rows in runs.items():
        med = statistics.median(t for t, _ in rows)
        print(f"{name:12}{med:10.2f}{med / floor:10.2f}{med / synced:10.2f}{2 * total / med / 1e9:10.2f}"
              f"{max(r for _, r in rows):13.0f}")
    print("goal: split ≤ 1.10 × floor, peak RSS < 300 MB (× +sync: against the same bytes written as durably)")


if __name__ == "__main__":
    main()
