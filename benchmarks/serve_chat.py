"""`twotower serve` under concurrent chat clients: how much of each turn's prompt the context tower reads.

Every chat client sends its whole conversation again with each turn. The server keeps a copy of the
context tower's state at the last user message of each of the last `--conversations` conversations, and a
turn that begins with a kept state reads only its new ids, also when it joins a running batch
(`PrefixReuse.join_one`). Two columns, one run, same model, same conversations:

    one kept state    `--conversations 1`: with several clients at once, a turn rarely finds its own
                      state (the previous `serve` under load read nearly every prompt afresh);
    one per client    `--conversations N` for N clients.

`--clients` threads each hold a conversation of `--turns` user messages (the bench prompts), all at once,
greedy, `-n` tokens a reply. The embedded tiny model has no chat template, so the model gets a minimal
role-prefix template (`TEMPLATE`). Reported: prompt tokens the context tower read (of all the turns'
prompt tokens), tok/s of replies over the run, mean latency, and whether the replies equal the first
column's (greedy; a reused state differs from a re-read only by rounding).

    python benchmarks/serve_chat.py                          # the embedded tiny model, CPU
    python benchmarks/serve_chat.py --clients 8 --turns 6 -n 32
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from serve import all_at_once, post  # benchmarks/serve.py

from twotower_cli import sampler as S
from twotower_cli.bench import DEFAULT_PROMPTS
from twotower_cli.runtime import open_runtime
from twotower_cli.serve import Engine, in_background
from twotower_cli.text import ChatTemplate

CHAT = "/v1/chat/completions"

TEMPLATE = ("{% for m in messages %}{{ m.role | upper }}: {{ m.content | trim }}\n{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def run_clients(rt, template: ChatTemplate, defaults: S.SamplingConfig, keep: int, clients: int, turns: int,
                n: int):
    """(prompt tokens, of them cached, reply tok/s over the run, latencies, replies by (client, turn))."""
    engine = Engine(rt.backend, rt.tokenizer, rt.eos_ids, defaults, "bench", template, conversations=keep,
                    max_batch=clients)
    totals = {"prompt": 0, "cached": 0, "completion": 0}
    latencies: list[float] = []
    replies: dict[tuple[int, int], str] = {}
    lock = threading.Lock()
    with in_background(engine) as url:
        post(url, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4}, CHAT)

        def client(c: int) -> None:
            messages: list[dict] = []
            for t in range(turns):
                messages.append({"role": "user", "content": DEFAULT_PROMPTS[(c + t) % len(DEFAULT_PROMPTS)]})
                t0 = time.perf_counter()
                out = post(url, {"messages": messages, "max_tokens": n, "temperature": 0}, CHAT)
                reply = out["choices"][0]["message"]["content"]
                messages.append({"role": "assistant", "content": reply})
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    replies[(c, t)] = reply
                    usage = out["usage"]
                    totals["prompt"] += usage["prompt_tokens"]
                    totals["cached"] += usage["prompt_tokens_details"]["cached_tokens"]
                    totals["completion"] += usage["completion_tokens"]

        wall = all_at_once(clients, client)
    return totals, totals["completion"] / wall, latencies, replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--mode", default="mask_diffusion", choices=S.MODES)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rt = open_runtime(args.model, need_denoiser=args.mode != "ar", device=args.device, threads=args.threads)
    defaults = rt.sampling(S.SamplingConfig(mode=args.mode, max_new_tokens=args.max_new_tokens))
    template = ChatTemplate({"default": TEMPLATE}, {}, "benchmarks/serve_chat.py")
    print(f"# twotower serve, chat · {rt.folder.name} · {args.mode} · {rt.backend.device} · {args.clients} clients × "
          f"{args.turns} turns × {args.max_new_tokens} tokens · greedy")
    rows = {}
    for label, keep in (("one kept state", 1), (f"one per client ({args.clients})", args.clients)):
        rows[label] = run_clients(rt, template, defaults, keep, args.clients, args.turns, args.max_new_tokens)
    print(f"{'':26}{'prompt tok':>12}{'read':>8}{'read %':>8}{'tok/s':>9}{'mean s':>8}{'same replies':>14}")
    base_replies = next(iter(rows.values()))[3]
    for label, (totals, tps, lat, replies) in rows.items():
        read = totals["prompt"] - totals["cached"]
        same = sum(replies[k] == base_replies[k] for k in base_replies)
        print(f"{label:26}{totals['prompt']:12d}{read:8d}{100 * read / totals['prompt']:7.1f}%{tps:9.1f}"
              f"{statistics.mean(lat):8.2f}{f'{same}/{len(base_replies)}':>14}")
    (one, _, _, _), (each, _, _, _) = rows.values()
    print(f"prompt tokens read: {one['prompt'] - one['cached']} → {each['prompt'] - each['cached']} "
          f"({(one['prompt'] - one['cached']) / max(each['prompt'] - each['cached'], 1):.2f}× fewer)")


if __name__ == "__main__":
    main()
