"""`twotower train --gradient-checkpointing`: one training step (context pass, denoiser forward and backward)
with every denoiser activation kept (before) vs each layer recomputed in backward (now), one process, same
batch, rounds interleaved.

"kept for backward" is what autograd saves (summed by a saved-tensors hook: the activation memory a step
holds at its peak, bar the parameters and gradients); "step ms" the fastest round's median.

    python benchmarks/train_step.py                          # the embedded tiny TwoTower, CPU
    python benchmarks/train_step.py --seq-len 1024 --batch 4
    python benchmarks/train_step.py --model PATH --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from twotower_cli import train as T
from twotower_cli.runtime import pick_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = pick_device(args.device)
    _, source, cfg = T.open_twotower(args.model)
    model = T.load_for_training(source, cfg, "all", device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (args.batch, args.seq_len), generator=gen)
    noisy, mask, t = T.add_noise(ids, args.block, cfg.mask_token_id, gen)
    ids, noisy, mask, t = ids.to(device), noisy.to(device), mask.to(device), t.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(checkpointing: bool) -> tuple[float, int, float]:
        model.zero_grad(set_to_none=True)
        saved = [0]

        def pack(x):
            saved[0] += x.numel() * x.element_size()
            return x

        sync()
        t0 = time.perf_counter()
        context = T.context_pass(model.context_tower, ids, args.block)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = T.BlockDenoiser(model, checkpointing)(noisy, t, context, ids, mask)
        loss.backward()
        sync()
        return time.perf_counter() - t0, saved[0], loss.item()

    step(False), step(True)  # warm-up
    best = {False: float("inf"), True: float("inf")}
    saved, losses = {}, {}
    for _ in range(args.rounds):
        for checkpointing in (False, True):
            runs = [step(checkpointing) for _ in range(args.calls)]
            best[checkpointing] = min(best[checkpointing], statistics.median(r[0] for r in runs))
            saved[checkpointing], losses[checkpointing] = runs[-1][1], runs[-1][2]
    print(f"# one training step · {source.folder.name} · {device} · batch {args.batch} × {args.seq_len} tokens · "
          f"block {args.block} · torch {torch.__version__} · {torch.get_num_threads()} threads")
    print(f"{'':28}{'kept for backward MiB':>22}{'step ms':>10}")
    for checkpointing, label in ((False, "every activation kept"), (True, "--gradient-checkpointing")):
        print(f"{label:28}{saved[checkpointing] / 2**20:22.1f}{best[checkpointing] * 1e3:10.1f}")
    print(f"activations {saved[False] / max(saved[True], 1):.1f}× smaller · step {best[True] / best[False]:.2f}× "
          f"the time · same loss: {losses[False] == losses[True]}")


if __name__ == "__main__":
    main()
