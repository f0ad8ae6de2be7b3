"""`--compile` vs eager on the steps it compiles, side by side from one run and one process.

`TowerBackend.compile` compiles each layer's norm and mixer in place; `torch.compiler.set_stance
("force_eager")` runs the very same modules eagerly, so both columns use one model, one cache layout and
one process. Steps: a one-token context extension (AR decode), a committed block extending the context
(`--block` tokens), and a denoiser block forward over that context. Each is warmed up (compilation) before
it is timed; rounds are interleaved and each column reports its fastest round (a shared machine's noise
hits both alike), as the median of `--calls` calls within a round.

Then whole generations, as `generate --prompt-file --batch-size 4 --compile` runs them: `--prompts` prompts
of different lengths under continuous batching (rows end and others join, so the batch size changes),
`ar` and `mask_diffusion`, eager and compiled (after `sampler.warm_up`, as the command does), best of
`--rounds`, with the graphs dynamo compiled after the warm-up (each one a recompilation inside the run).

    python benchmarks/compile.py [--model tiny] [--device cpu] [--prompt 256] [--block 16] [--rounds 5]
                                 [--prompts 6] [--width 4] [--new 64]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded tiny TwoTower)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt", type=int, default=256, help="context tokens before the timed steps")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20, help="calls per step per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=6, help="prompts of the generation rows")
    ap.add_argument("--width", type=int, default=4, help="their continuous batch's width")
    ap.add_argument("--new", type=int, default=64, help="tokens per prompt at most")
    args = ap.parse_args()

    from twotower_cli.runtime import open_runtime
    from twotower_cli.sampler import SamplingConfig

    rt = open_runtime(args.model, True, device=args.device, dtype=args.dtype, threads=args.threads)
    backend = rt.backend
    dev = backend.device
    gen = torch.Generator().manual_seed(0)
    vocab = rt.cfg.vocab_size
    prompt = torch.randint(4, vocab, (1, args.prompt), generator=gen)
    one = torch.randint(4, vocab, (1, 1), generator=gen)
    block = torch.randint(4, vocab, (1, args.block), generator=gen)
    masks = torch.full((1, args.block), SamplingConfig.mask_token_id)
    t = torch.ones(1, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def fresh():
        backend.reset(1)
        backend.extend(prompt)  # prompts run eagerly either way (a context step of neither 1 nor a block)

    # name: (step, whether each call starts from the fresh context; decode calls keep extending it)
    steps = {
        "decode (1 token)": (lambda: backend.extend(one), False),
        f"context + block ({args.block})": (lambda: backend.extend(block), True),
        f"denoise block ({args.block})": (lambda: backend.denoise(masks, t), False),
    }

    def time_step(fn, refresh: bool) -> float:
        out = []
        for _ in range(args.calls):
            if refresh:
                fresh()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    t_compile = time.perf_counter()
    backend.compile()
    with torch.no_grad():
        fresh()
        backend.denoise(masks, t)  # context steps of a denoised block's width are the compiled ones
        for fn, _ in steps.values():  # warm-up: every graph compiled (decode with a past, blocks with one)
            for _ in range(3):
                fresh()
                fn()
                fn()
        t_compile = time.perf_counter() - t_compile
        best = {name: {"eager": float("inf"), "compiled": float("inf")} for name in steps}
        for _ in range(args.rounds):
            for name, (fn, refresh) in steps.items():
                fresh()
                with torch.compiler.set_stance("force_eager"):
                    best[name]["eager"] = min(best[name]["eager"], time_step(fn, refresh))
                fresh()
                best[name]["compiled"] = min(best[name]["compiled"], time_step(fn, refresh))

    print(f"# --compile vs eager · {rt.folder.name} · {dev} · {backend.ar.lm_head.weight.dtype} · "
          f"torch {torch.__version__} · {torch.get_num_threads()} threads · context {args.prompt} tokens")
    print(f"compilation and warm-up: {t_compile:.1f} s")
    print(f"{'step':26}{'eager ms':>10}{'compiled ms':>13}{'speed-up':>10}")
    for name, r in best.items():
        print(f"{name:26}{r['eager'] * 1e3:10.2f}{r['compiled'] * 1e3:13.2f}{r['eager'] / r['compiled']:9.2f}×")
    generations(rt, args, gen)


def generations(rt, args, gen: torch.Generator) -> None:
    """The whole-generation rows (module docstring)."""
    from torch._dynamo.utils import counters

    from twotower_cli import sampler as S
    from twotower_cli.batching import Continuous, run_in_order

    vocab = rt.cfg.vocab_size
    prompts = [torch.randint(4, vocab, (n,), generator=gen).tolist()
               for n in (3 + (11 * i) % 29 for i in range(args.prompts))]  # 3 to 31 tokens
    print(f"\n# generations: {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"continuous batching {args.width} wide, up to {args.new} new tokens each, block {args.block}")
    print(f"{'mode':16}{'warm-up s':>10}{'eager tok/s':>13}{'compiled tok/s':>16}{'speed-up':>10}{'graphs after warm-up':>22}")
    for mode in ("ar", "mask_diffusion"):
        cfg = rt.sampling(S.SamplingConfig(mode=mode, max_new_tokens=args.new, block_size=args.block), block=args.block)
        warm = S.warm_up(rt.backend, prompts[:args.width], cfg, rt.eos_ids)
        before = counters["stats"]["unique_graphs"]
        best = {"eager": 0.0, "compiled": 0.0}
        for _ in range(args.rounds):
            for column in best:
                t0 = time.perf_counter()
                with torch.compiler.set_stance("force_eager") if column == "eager" else contextlib.nullcontext():
                    batch = Continuous(rt.backend, cfg, rt.eos_ids, torch.Generator().manual_seed(0))
                    tokens = sum(len(g.token_ids) for _, g, _ in run_in_order(batch, prompts, width=args.width))
                best[column] = max(best[column], tokens / (time.perf_counter() - t0))
        after = counters["stats"]["unique_graphs"] - before
        print(f"{mode:16}{warm:10.1f}{best['eager']:13.1f}{best['compiled']:16.1f}"
              f"{best['compiled'] / best['eager']:9.2f}×{after:22d}")


if __name__ == "__main__":
    main()
