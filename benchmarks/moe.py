"""One MoE layer's routed experts: the per-expert loop (baseline) vs grouped GEMMs (`moe.Experts`), one run.

`MoE.forward` sorts a step's (token, slot) pairs by expert; `Experts` then runs either one matmul pair per
expert that got a token (plus a `.tolist()` of the counts: a host sync on CUDA) or two `F.grouped_mm` calls
whatever the routing. Both give the same numbers (tests/test_model.py). Token counts as the sampler makes
them: 1 (a decode step), 16 (a denoiser block), 64 (four prompts' blocks, or a short prefill).

Columns: best of --rounds (interleaved) in ms for the whole MoE layer (router, experts, shared expert): the
loop, and the default, with the route the default took (on the CPU it keeps the loop for few rows over many
experts, `moe.CPU_ROWS_PER_GROUP`), and the ratio loop / default (> 1: the default is faster). Defaults: Nano's routing (128 experts, top 6) at a width
the CPU runs in seconds; `--hidden 2688 --intermediate 1856 --dtype bf16` is Nano's layer (on CUDA).

    python benchmarks/moe.py [--backward] [--slice-memory]   # CPU, fp32, hidden 512 (+ training's backward,
                                                             # + a long prompt's memory in one piece vs slices)
    python benchmarks/moe.py --device cuda --dtype bf16 --hidden 2688 --intermediate 1856
"""

from __future__ import annotations

import argparse
import time

import torch

from twotower_cli.config import NemotronHConfig
from twotower_cli.model.moe import _GROUPED_MM, Experts, MoE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_ms(fn, device: torch.device, rounds: int, inner: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / inner * 1e3)
    return best


def run(device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int, experts: int = 128,
        top_k: int = 6, tokens: tuple[int, ...] = (1, 16, 64), rounds: int = 5, inner: int = 20) -> None:
    """Print the table (see the module docstring)."""
    if _GROUPED_MM is None:
        print("this torch has no grouped GEMM (F.grouped_mm / torch._grouped_mm): nothing to compare")
        return
    cfg = NemotronHConfig.build("E", hidden_size=hidden, moe_intermediate_size=intermediate,
                                n_routed_experts=experts, num_experts_per_tok=top_k,
                                moe_shared_expert_intermediate_size=2 * intermediate, n_shared_experts=1,
                                n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                                vocab_size=256)
    with torch.device(device):  # random weights drawn on the device (Nano's layer is 1.3 G numbers)
        moe = MoE(cfg, torch.float64).requires_grad_(False)
    gen = torch.Generator(device).manual_seed(0)
    for p in list(moe.parameters()) + list(moe.buffers()):
        p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
    moe.to(dtype)
    moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    g = torch.Generator().manual_seed(1)
    print(f"MoE layer · {experts} experts, top {top_k} · hidden {hidden}, expert {intermediate} · "
          f"{str(dtype).removeprefix('torch.')} on {device} · best of {rounds}×{inner}, ms per call")
    print(f"{'tokens':>7}{'experts used':>14}{'loop':>10}{'default':>10}{'route':>9}{'ratio':>8}")
    for n in tokens:
        x = torch.randn(1, n, hidden, generator=g).to(device, dtype)
        used = moe.gate(x[0], torch.float64)[1].unique().numel()
        times: dict[str, float] = {}
        with torch.no_grad():
            for _ in range(rounds):  # interleaved, so drift hits both
                for route in ("loop", "default"):
                    Experts.grouped = route == "default"
                    ms = best_ms(lambda x=x: moe(x), device, 1, inner)
                    times[route] = min(times.get(route, ms), ms)
            Experts.grouped = True
            rows = torch.empty(n * top_k, hidden, dtype=dtype, device=device)
            took = "grouped" if moe.experts._grouped_runs(rows) else "loop"
        ratio = times["loop"] / times["default"]
        print(f"{n:7d}{used:14d}{times['loop']:10.3f}{times['default']:10.3f}{took:>9}{ratio:7.2f}×")


def backward(device: torch.device, hidden: int, intermediate: int, experts: int = 128, rows: int = 96,
             rounds: int = 2) -> None:
    """Training's route (the loop, fp32, autograd): forward + backward of the routed experts, with each
    expert's weights taken by indexing the stacks (baseline: each expert's backward then zero-fills a
    gradient of the whole stack) vs `Experts._loop` (the stacks unbound once: one gradient per stack)."""
    import torch.nn.functional as F

    layer = Experts(experts, hidden, intermediate).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, experts, (rows,), generator=g).sort().values.to(device)
    ends = torch.searchsorted(ids, torch.arange(experts, device=device), right=True, out_int32=True)
    x = torch.randn(rows, hidden, generator=g).to(device)

    def indexed() -> torch.Tensor:
        parts, start = [], 0
        for e, end in enumerate(ends.tolist()):
            if end > start:
                h = torch.relu(F.linear(x[start:end], layer.up_proj[e])).square()
                parts.append(F.linear(h, layer.down_proj[e]))
            start = end
        return torch.cat(parts)

    times: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in (("indexed", indexed), ("unbound", lambda: layer(x, ends))):
            def step(fn=fn) -> None:
                layer.zero_grad(set_to_none=True)
                fn().square().mean().backward()
            ms = best_ms(step, device, 1, 1)
            times[name] = min(times.get(name, ms), ms)
    used = int((ends.diff(prepend=ends.new_zeros(1)) > 0).sum())
    print(f"training route (loop + backward) · {experts} experts, {used} used by {rows} rows · hidden {hidden}, "
          f"expert {intermediate} · fp32 on {device} · best of {rounds}, ms")
    print(f"{'indexed':>12}{'unbound':>12}{'ratio':>8}")
    print(f"{times['indexed']:12.1f}{times['unbound']:12.1f}{times['indexed'] / times['unbound']:7.1f}×")


def slice_memory(tokens: int = 8192, hidden: int = 2688) -> None:
    """Peak RSS growth of one MoE forward over a `tokens`-token prompt (fp32 experts, fp64 router, 16
    experts of 256: the row buffers, not the weights, are what is measured), routed in one piece vs in
    slices of MOE_SLICE_TOKENS. Each in its own process: ru_maxrss only grows."""
    import subprocess
    import sys

    code = (
        "import resource, sys, torch\n"
        "from twotower_cli.config import NemotronHConfig\n"
        "from twotower_cli.model import moe as M\n"
        "M.MOE_SLICE_TOKENS = int(sys.argv[1]) or M.MOE_SLICE_TOKENS\n"
        f"cfg = NemotronHConfig.build('E', hidden_size={hidden}, moe_intermediate_size=256, n_routed_experts=16,"
        " num_experts_per_tok=6, moe_shared_expert_intermediate_size=256, n_shared_experts=1, n_group=1,"
        " topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, vocab_size=256)\n"
        "moe = M.MoE(cfg, torch.float64).requires_grad_(False)\n"
        "[p.data.normal_(0, 0.02) for p in list(moe.parameters()) + list(moe.buffers())]\n"
        f"x = torch.randn(1, {tokens}, {hidden})\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with torch.no_grad(): moe(x)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    print(f"MoE forward over a {tokens}-token prompt (hidden {hidden}, 16 experts, top 6, fp32, router fp64): "
          "peak RSS growth, MiB")
    print(f"{'one piece':>12}{'slices':>12}")
    grew = [float(subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                                 check=True).stdout) for arg in (str(10**9), "0")]
    print(f"{grew[0]:12.0f}{grew[1]:12.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--backward", action="store_true", help="also time the training route's backward")
    ap.add_argument("--slice-memory", action="store_true",
                    help="also measure a long prompt's peak memory, in one piece vs in slices (CPU)")
    args = ap.parse_args()
    run(torch.device(args.device), DTYPES[args.dtype], args.hidden, args.intermediate, args.experts, args.top_k,
        tuple(args.tokens), args.rounds, args.inner)
    if args.backward:
        print()
        backward(torch.device(args.device), args.hidden, args.intermediate, args.experts)
    if args.slice_memory:
        print()
        slice_memory()


if __name__ == "__main__":
    main()
