"""`twotower serve` under concurrent clients, one run, same model, same requests, three ways:

    one at a time   `--max-batch 1`: requests sampled one after the other (the first `serve`);
    closed batches  `--no-continuous`: the requests waiting together sampled as one batch, which takes no
                    one in until all of it is done (the second `serve`);
    continuous      the default: a request that comes while a batch runs joins it at its next block, and
                    each leaves when its own rows end.

Each column starts an in-process server (the real HTTP handler and engine) and has `--clients` threads post
`--requests` completions each, all at once, greedy; request i asks for `--lengths`[i mod k] tokens (mixed
lengths by default: then a closed batch runs as long as its longest request while its short ones' clients
wait to send their next). A client sends its next request when the last one is answered (as evaluation
harnesses with a concurrency limit do). Reported: completion tokens per second over the whole run (wall
clock, all clients), the mean and the worst latency of a request, and whether every reply equals the
one-at-a-time column's (greedy replies do not depend on the batch).

    python benchmarks/serve.py                                  # the embedded tiny model, CPU
    python benchmarks/serve.py --clients 16 --requests 4 --lengths 64
    python benchmarks/serve.py --model PATH --device cuda       # a real checkpoint on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable

from twotower_cli import sampler as S
from twotower_cli.bench import DEFAULT_PROMPTS
from twotower_cli.runtime import open_runtime
from twotower_cli.serve import Engine, in_background


def post(url: str, body: dict, path: str = "/v1/completions") -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def all_at_once(clients: int, client: Callable[[int], None]) -> float:
    """Run client(0..clients-1) in threads released together; the seconds until the last one is done."""
    start = threading.Barrier(clients + 1)

    def run(c: int) -> None:
        start.wait()
        client(c)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_clients(rt, defaults: S.SamplingConfig, max_batch: int, continuous: bool, clients: int, requests: int,
                lengths: list[int]):
    """(tokens/s over the run, latencies, replies by (client, request))."""
    engine = Engine(rt.backend, rt.tokenizer, rt.eos_ids, defaults, "bench", max_batch=max_batch,
                    continuous=continuous)
    latencies: list[float] = []
    replies: dict[tuple[int, int], str] = {}
    tokens = [0]
    lock = threading.Lock()
    with in_background(engine) as url:
        post(url, {"prompt": "warm up", "max_tokens": 4})

        def client(c: int) -> None:
            for r in range(requests):
                i = c * requests + r
                prompt = DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]
                t0 = time.perf_counter()
                out = post(url, {"prompt": prompt, "max_tokens": lengths[i % len(lengths)], "temperature": 0})
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    replies[(c, r)] = out["choices"][0]["text"]
                    tokens[0] += out["usage"]["completion_tokens"]

        wall = all_at_once(clients, client)
    return tokens[0] / wall, latencies, replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--mode", default="mask_diffusion", choices=S.MODES)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after the other")
    ap.add_argument("--lengths", default="16,64,128", help="max_tokens of request i: item i mod k of this list")
    ap.add_argument("--max-batch", type=int, default=None, help="the batched columns' limit (default: --clients)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rt = open_runtime(args.model, need_denoiser=args.mode != "ar", device=args.device, threads=args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    defaults = rt.sampling(S.SamplingConfig(mode=args.mode))
    batched = args.max_batch or args.clients
    print(f"# twotower serve · {rt.folder.name} · {args.mode} · {rt.backend.device} · {args.clients} clients × "
          f"{args.requests} requests × {'/'.join(map(str, lengths))} tokens · greedy")
    rows = {}
    for label, limit, continuous in (("one at a time", 1, False), (f"closed batches (≤ {batched})", batched, False),
                                     (f"continuous (≤ {batched})", batched, True)):
        rows[label] = run_clients(rt, defaults, limit, continuous, args.clients, args.requests, lengths)
    print(f"{'':26}{'tok/s':>10}{'× one':>8}{'mean latency s':>16}{'worst s':>10}{'same replies':>14}")
    base_tps, _, base_replies = rows["one at a time"]
    for label, (tps, lat, replies) in rows.items():
        same = sum(replies[k] == base_replies[k] for k in base_replies)
        print(f"{label:26}{tps:10.1f}{tps / base_tps:7.2f}×{statistics.mean(lat):16.2f}{max(lat):10.2f}"
              f"{f'{same}/{len(base_replies)}':>14}")
    (closed, _, _), (cont, _, _) = list(rows.values())[1:]
    print(f"continuous vs closed batches: {cont / closed:.2f}× the throughput")


if __name__ == "__main__":
    main()
