"""`twotower chat`: the prompt phase of each turn when the context tower keeps its state between turns
(`chat.PrefixReuse`, now) vs when it reads the whole conversation again (a fresh backend per turn, before),
one run, same model, same ids.

Both columns feed the same prompt ids; the last line counts the turns whose replies are identical (in fp32
all of them; in bf16 a chunked prefill and several shorter extends round differently). "prompt ms" is the
time from the start of the turn to the sampler's first event: encoding done, the context tower's prefill
(re-read: all of the conversation; kept: what it does not hold) and, for `mock_ar`, the first denoiser call.
"turn s" is the whole turn, reply included.

    python benchmarks/chat.py                              # the embedded tiny model, CPU
    python benchmarks/chat.py --turns 12 -n 96 --threads 2
    python benchmarks/chat.py --model PATH --device cuda   # a real checkpoint on a GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from twotower_cli import sampler as S
from twotower_cli.chat import Conversation, PrefixReuse, Turn, start_from
from twotower_cli.runtime import open_runtime
from twotower_cli.towers import TowerBackend

LINES = ["ROMEO.", "JULIET.", "And God said", "KING HENRY.", "FIRST CITIZEN.", "HAMLET.", "And it came to pass",
         "PORTIA."]


def timed_turn(backend, prompt: list[int], cfg: S.SamplingConfig, eos: list[int], before=None):
    """(seconds to the first event, seconds for the turn, the generation, ids fed to the context tower by
    then if the backend counts them)."""
    fed0 = getattr(backend, "fed", 0)
    t0 = time.perf_counter()
    if before is not None:
        before()
    first = read = None
    for ev in S.generate(backend, [prompt], cfg, eos):
        if first is None:
            first, read = time.perf_counter() - t0, getattr(backend, "fed", 0) - fed0
        if isinstance(ev, S.Finished):
            return first, time.perf_counter() - t0, ev.generations[0], read
    raise AssertionError("no Finished event")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--mode", default="mask_diffusion", choices=S.MODES)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rt = open_runtime(args.model, need_denoiser=args.mode != "ar", device=args.device, threads=args.threads)
    cfg = rt.sampling(S.SamplingConfig(mode=args.mode, max_new_tokens=args.max_new_tokens))
    conversation = Conversation(rt.tokenizer, None)
    kept = PrefixReuse(rt.backend)
    reread = TowerBackend(rt.loaded.twotower, rt.loaded.ar)  # the same weights, its own cache
    print(f"twotower chat · {rt.folder.name} · {args.mode} · {args.turns} turns × up to {args.max_new_tokens} tokens "
          f"· {rt.backend.device} · torch {torch.__version__} · {torch.get_num_threads()} threads")
    print(f"{'turn':>4}{'context':>9}{'read':>6}{'prompt ms re-read':>19}{'kept':>8}{'ratio':>8}"
          f"{'turn s re-read':>16}{'kept':>7}")
    timed_turn(reread, rt.tokenizer.encode(LINES[0]), cfg, rt.eos_ids)  # warm-up, not shown
    sums, same = [0.0, 0.0, 0.0, 0.0], 0
    for i in range(args.turns):
        user = LINES[i % len(LINES)]
        prompt, history = conversation.prompt(user)
        first_re, whole_re, g_re, _ = timed_turn(reread, prompt, cfg, rt.eos_ids)
        first_kept, whole_kept, g, read = timed_turn(kept, prompt, cfg, rt.eos_ids,
                                                     before=lambda p=prompt, h=history: start_from(kept, p, h))
        same += g.token_ids == g_re.token_ids
        conversation.add(Turn(user, rt.tokenizer.decode(g.token_ids), g, len(prompt), read))
        for j, v in enumerate((first_re, first_kept, whole_re, whole_kept)):
            sums[j] += v
        print(f"{i + 1:>4}{len(prompt):>9}{read:>6}{first_re * 1e3:19.1f}{first_kept * 1e3:8.1f}"
              f"{first_re / first_kept:7.2f}×{whole_re:16.2f}{whole_kept:7.2f}")
    print(f"{'all':>4}{'':>15}{sums[0] * 1e3:19.1f}{sums[1] * 1e3:8.1f}{sums[0] / sums[1]:7.2f}×"
          f"{sums[2]:16.2f}{sums[3]:7.2f}")
    print(f"identical replies: {same}/{args.turns} turns ({rt.backend.ar.lm_head.weight.dtype}: in fp32 all should "
          f"be; in bf16 one prefill and several extends round differently)")


if __name__ == "__main__":
    main()
