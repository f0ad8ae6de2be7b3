"""mask_diffusion with a stop text: looked for after each block only (the baseline, what the sampler did
before) vs also before each step on the block's committed prefix (`fill_block`'s `decided`), one run, same
model, same prompts. The baseline is the same sampler with `until` answering only at block ends, so both
columns run the same code but for when the stop is seen.

Reported per column: forwards over the sequences (each sequence's own NFE, summed; what a sequence alone
pays), the batch's forwards, wall time (median of interleaved repeats), and whether every sequence's text
equals the baseline's (the stop ends the text at the same place; only steps after it are saved).

    python benchmarks/stop_text.py                         # the embedded tiny model, CPU, 16 prompts
    python benchmarks/stop_text.py --stop-text . --batch-size 1
"""

from __future__ import annotations

import argparse
import statistics
import time

from twotower_cli import sampler as S
from twotower_cli.bench import DEFAULT_PROMPTS
from twotower_cli.runtime import open_runtime
from twotower_cli.text import StopTexts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--stop-text", default="\n\n")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per column; the median time counts")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rt = open_runtime(args.model, need_denoiser=True, device=args.device, threads=args.threads)
    cfg = rt.sampling(S.SamplingConfig(max_new_tokens=args.max_new_tokens))
    prompts = [rt.tokenizer.encode(DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] + " " * (i // len(DEFAULT_PROMPTS)))
               for i in range(args.prompts)]
    stops = StopTexts([args.stop_text], rt.tokenizer.decode, S.stop_set(cfg, rt.eos_ids), cfg.block_size)
    per_step = stops.until

    def at_block_ends(row: int, ids: list[int]) -> bool:  # the baseline: blind to a block's prefix
        return len(ids) % cfg.block_size == 0 and per_step(row, ids)

    def run(until):
        texts, seq_nfe, nfe, ended = [], 0, 0, 0
        for first in range(0, len(prompts), args.batch_size):
            done = S.run(rt.backend, prompts[first:first + args.batch_size], cfg, rt.eos_ids, until=until)
            texts += [stops.final(g.token_ids)[0] for g in done.generations]
            seq_nfe += sum(g.nfe for g in done.generations)
            nfe += done.nfe
            ended += sum(g.finish_reason == "stop" for g in done.generations)
        return texts, seq_nfe, nfe, ended

    S.run(rt.backend, prompts[:2], cfg, rt.eos_ids)  # warm up
    columns = {"after each block": at_block_ends, "each step (now)": per_step}
    times: dict[str, list[float]] = {name: [] for name in columns}
    results = {}
    for _ in range(args.repeats):  # interleaved, so that both see the same machine
        for name, until in columns.items():
            t0 = time.perf_counter()
            results[name] = run(until)
            times[name].append(time.perf_counter() - t0)
    base_texts = results["after each block"][0]
    print(f"# {args.prompts} prompts of {rt.folder.name}, -n {args.max_new_tokens}, block {cfg.block_size}, "
          f"batches of {args.batch_size}, stop text {args.stop_text!r}, {rt.backend.device}, "
          f"median of {args.repeats}")
    print(f"{'stop looked for':<18} {'seq forwards':>12} {'batch forwards':>14} {'seconds':>8} {'same texts':>10}")
    for name, (texts, seq_nfe, nfe, _) in results.items():
        print(f"{name:<18} {seq_nfe:>12} {nfe:>14} {statistics.median(times[name]):>8.3f} "
              f"{str(texts == base_texts):>10}")
    print(f"({results['after each block'][3]} of {len(prompts)} sequences end at the stop text)")


if __name__ == "__main__":
    main()
