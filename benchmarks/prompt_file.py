"""`twotower generate --prompt-file` without the live view: fixed batches (each runs until its longest
sequence ends, the ended ones still in every forward; what generate did before) vs continuous batching (a
prompt takes the place of a sequence as soon as it ends), one run, same model, same prompts, same width.

Sequences end at different lengths when they meet an end id; the embedded tiny model has no end of text in
its corpus, so by default a comma ends a sequence (`--stop-text`), as the end of a reply does on a chat
model. Reported per column: generated tokens per second over the whole file, NFE (forwards) and whether
every sequence's tokens equal the fixed-batch column's (greedy decoding does not depend on the batch).

    python benchmarks/prompt_file.py                      # the embedded tiny model, CPU, 32 prompts
    python benchmarks/prompt_file.py --prompts 64 --batch-size 16 --mode ar
"""

from __future__ import annotations

import argparse
import statistics
import time

from twotower_cli import sampler as S
from twotower_cli.batching import Continuous, run_in_order
from twotower_cli.bench import DEFAULT_PROMPTS
from twotower_cli.runtime import open_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--mode", default="mask_diffusion", choices=S.MODES)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=128)
    ap.add_argument("--stop-text", default=",", help="its token ends a sequence ('' for the model's end ids only)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per column; the median time counts")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rt = open_runtime(args.model, need_denoiser=args.mode != "ar", device=args.device, threads=args.threads)
    stop = tuple(rt.tokenizer.encode(args.stop_text, add_special_tokens=False)) if args.stop_text else ()
    cfg = rt.sampling(S.SamplingConfig(mode=args.mode, max_new_tokens=args.max_new_tokens, stop_ids=stop))
    prompts = [rt.tokenizer.encode(DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] + " " * (i // len(DEFAULT_PROMPTS)))
               for i in range(args.prompts)]
    S.run(rt.backend, prompts[:2], cfg, rt.eos_ids)  # warm up

    def run_fixed():
        out, nfe = [], 0
        for first in range(0, len(prompts), args.batch_size):
            done = S.run(rt.backend, prompts[first:first + args.batch_size], cfg, rt.eos_ids)
            out += [g.token_ids for g in done.generations]
            nfe += done.nfe
        return out, nfe

    def run_continuous():
        batch = Continuous(rt.backend, cfg, rt.eos_ids)
        return [g.token_ids for _, g, _ in run_in_order(batch, prompts, width=args.batch_size)], batch.nfe

    times: dict[str, list[float]] = {"fixed": [], "continuous": []}
    for _ in range(args.repeats):  # interleaved, so that both see the same machine
        for name, fn in (("fixed", run_fixed), ("continuous", run_continuous)):
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "fixed":
                fixed, fixed_nfe = result
            else:
                cont, cont_nfe = result
    fixed_s, cont_s = (statistics.median(times[k]) for k in ("fixed", "continuous"))

    tokens = sum(len(t) for t in fixed)
    lengths = sorted(len(t) for t in fixed)
    print(f"# generate --prompt-file · {rt.folder.name} · {args.mode} · {rt.backend.device} · {len(prompts)} prompts · "
          f"batch {args.batch_size} · ≤ {args.max_new_tokens} tokens (median {lengths[len(lengths) // 2]}, "
          f"{lengths[0]}–{lengths[-1]}) · greedy · median of {args.repeats}")
    print(f"{'':22}{'tok/s':>10}{'NFE':>8}{'seconds':>10}")
    print(f"{'fixed batches':22}{tokens / fixed_s:10.1f}{fixed_nfe:8d}{fixed_s:10.2f}")
    print(f"{'continuous':22}{tokens / cont_s:10.1f}{cont_nfe:8d}{cont_s:10.2f}")
    same = sum(a == b for a, b in zip(fixed, cont, strict=True))
    print(f"continuous vs fixed: {fixed_s / cont_s:.2f}× the throughput · identical sequences: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
