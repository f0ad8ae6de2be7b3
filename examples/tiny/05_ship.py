"""Stage 5: copy the tiny base and the trained tiny TwoTower into the package, in fp16.

    .venv/bin/python examples/tiny/05_ship.py [--base work/tiny-base] [--twotower work/tiny-twotower]

Writes src/twotower_cli/assets/tiny-base/ and src/twotower_cli/assets/tiny-twotower/ (config, fp16
safetensors, tokenizer and generation files). Floating tensors become fp16 except the ones the spec keeps in
fp32 (A_log, D, dt_bias, router weight and correction bias), so the context tower of the TwoTower stays
byte-identical to the base's tensors. Each result is checked with `twotower inspect` and the total size is
printed (the package allows 25 MB).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from twotower_cli.checkpoint import open_checkpoint, write_checkpoint
from twotower_cli.layout import keep_fp32

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent.parent / "src" / "twotower_cli" / "assets"
EXTRA = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def ship(src: Path, dst: Path) -> int:
    ckpt = open_checkpoint(src)
    tensors = {}
    for name, t in ckpt.iter_tensors(sorted(ckpt.tensors)):
        tensors[name] = t if (keep_fp32(name) or not t.is_floating_point()) else t.to(torch.float16)
    config = dict(ckpt.config_raw)
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    if isinstance(config.get("twotower"), dict):  # not this machine's path: what a user can find
        config["twotower"] = {**config["twotower"], "source": "tiny-base (examples/tiny)"}
    write_checkpoint(dst, tensors, config, [src / f for f in EXTRA if (src / f).is_file()], force=True)
    subprocess.run([sys.executable, "-m", "twotower_cli", "inspect", str(dst)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return sum(p.stat().st_size for p in dst.iterdir())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=HERE / "work" / "tiny-base")
    p.add_argument("--twotower", type=Path, default=HERE / "work" / "tiny-twotower")
    a = p.parse_args()
    sizes = {name: ship(src, ASSETS / name) for name, src in (("tiny-base", a.base), ("tiny-twotower", a.twotower))}
    for name, size in sizes.items():
        print(f"{name}: {size / 1e6:.2f} MB")
    print(f"total: {sum(sizes.values()) / 1e6:.2f} MB (limit 25 MB)")
    trainer_state = ASSETS / "tiny-twotower" / "trainer_state.pt"
    if trainer_state.exists():  # never ship optimizer state
        trainer_state.unlink()
    shutil.rmtree(ASSETS / "tiny-twotower" / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
