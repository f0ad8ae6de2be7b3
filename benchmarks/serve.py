"""`twotower serve` under concurrent clients: requests sampled one at a time (`--max-batch 1`, before) vs the
requests that wait together sampled as one batch (`--max-batch N`, now), one run, same model, same requests.

Each column starts an in-process server (the real HTTP handler and engine) and has `--clients` threads post
`--requests` completions each, all at once, greedy, `-n` tokens each; a client sends its next request when
the last one is answered (as evaluation harnesses with a concurrency limit do). Reported: completion tokens
per second over the whole run (wall clock, all clients), the mean and the worst latency of a request, and
whether every reply equals the one-at-a-time column's (greedy replies do not depend on the batch).

    python benchmarks/serve.py                                  # the embedded tiny model, CPU
    python benchmarks/serve.py --clients 16 --requests 4 -n 64
    python benchmarks/serve.py --model PATH --device cuda       # a real checkpoint on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request

from twotower_cli import sampler as S
from twotower_cli.bench import DEFAULT_PROMPTS
from twotower_cli.runtime import open_runtime
from twotower_cli.serve import Engine, make_server


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def run_clients(rt, defaults: S.SamplingConfig, max_batch: int, clients: int, requests: int, n: int):
    """(tokens/s over the run, latencies, replies by (client, request), batch sizes seen)."""
    engine = Engine(rt.backend, rt.tokenizer, rt.eos_ids, defaults, "bench", max_batch=max_batch)
    server = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    post(url, {"prompt": "warm up", "max_tokens": 4})
    latencies: list[float] = []
    replies: dict[tuple[int, int], str] = {}
    tokens = [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for r in range(requests):
            prompt = DEFAULT_PROMPTS[(c * requests + r) % len(DEFAULT_PROMPTS)]
            t0 = time.perf_counter()
            out = post(url, {"prompt": prompt, "max_tokens": n, "temperature": 0})
            with lock:
                latencies.append(time.perf_counter() - t0)
                replies[(c, r)] = out["choices"][0]["text"]
                tokens[0] += out["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.shutdown()
    server.server_close()
    return tokens[0] / wall, latencies, replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--mode", default="mask_diffusion", choices=S.MODES)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after the other")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=None, help="the batched column's limit (default: --clients)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rt = open_runtime(args.model, need_denoiser=args.mode != "ar", device=args.device, threads=args.threads)
    defaults = rt.sampling(S.SamplingConfig(mode=args.mode, max_new_tokens=args.max_new_tokens))
    batched = args.max_batch or args.clients
    print(f"# twotower serve · {rt.folder.name} · {args.mode} · {rt.backend.device} · {args.clients} clients × "
          f"{args.requests} requests × {args.max_new_tokens} tokens · greedy")
    rows = {}
    for label, limit in (("one at a time", 1), (f"batched (≤ {batched})", batched)):
        rows[label] = run_clients(rt, defaults, limit, args.clients, args.requests, args.max_new_tokens)
    print(f"{'':22}{'tok/s':>10}{'mean latency s':>16}{'worst s':>10}")
    for label, (tps, lat, _) in rows.items():
        print(f"{label:22}{tps:10.1f}{statistics.mean(lat):16.2f}{max(lat):10.2f}")
    (base_tps, _, base_replies), (tps, _, replies) = rows.values()
    same = sum(replies[k] == base_replies[k] for k in base_replies)
    print(f"throughput ratio: {tps / base_tps:.2f}× · identical replies: {same}/{len(base_replies)}")


if __name__ == "__main__":
    main()
