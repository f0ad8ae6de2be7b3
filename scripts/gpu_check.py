"""GPU check for issue 8, one run on one H100 in well under 8 minutes:

1. `pytest -m gpu tests/test_kernels.py tests/test_train.py`: mamba-ssm / causal-conv1d kernels == the torch
   reference (prefill, one-token decode, seeded blocks shorter than chunk_size, conv, gated norm, SDPA), and
   `train --fsdp` on one GPU (torchrun, NCCL) == the unsharded run;
2. a TwoTower with the real Nemotron-3-Nano dimensions (hidden 2688, Mamba 64×64 heads, 8 groups, state 128,
   chunk 128, attention 32/2×128, 128 experts top-6 of 1856 + a 3712 shared expert, vocab 131072) but only
   the first 7 layers of its pattern ("MEMEM*E"), random weights, bf16 (A_log, D, dt_bias, router fp32);
3. one table, side by side from the same run: torch path (TWOTOWER_KERNELS=torch, explicit attention) vs
   kernel path with SDPA choosing its own backend (cuDNN attention first on sm90 with torch 2.11: the
   baseline) vs the kernel path as it runs (SDPA without cuDNN, `attention.sdpa_backends`) vs that path with
   `--cuda-graphs` (decode steps and block denoises replayed): prefill tok/s, decode tok/s, block-denoise
   ms. In section 4, random weights
   are never confident, so the threshold policy commits ~1 token per NFE; the fixed-steps row (policy topk,
   4 steps per block of 16) shows 4 tok/NFE;
4. `ar` vs `mask_diffusion` tok/s and tokens/NFE (the last column's path), for one prompt and for a batch of
   8 (what `serve --max-batch` gains on a GPU), and 24 requests of mixed lengths 8 at a time in fixed batches
   vs continuous batching (what `serve` and `generate --prompt-file` do); for one decode step and one
   block denoise: host syncs (CUDA's sync debug mode), GPU activities (profiler), and eager vs CUDA-graph
   replay ms (what graphs could give; a capture failure names what is not capture-safe), and where the
   host's time goes (cProfile, torch and kernel path); `--cuda-graphs` vs eager: the denoiser step replayed
   within a block at 4 and 8 steps a block, and ar's decode step replayed over fixed-size key/value
   buffers; `twotower chat`'s prompt phase with the context tower's state kept between turns vs read again;
5. attention at Nano's sizes with masks (commit, padded batches, the training block mask): the previous SDPA
   dispatch (grouped keys/values with a mask) vs `Attention._sdpa`, ms and peak memory, and decode with the
   keys growing by one a step, SDPA's default backends vs `sdpa_backends`;
6. one MoE layer at Nano's sizes: the routed experts as a per-expert loop vs grouped GEMMs (`moe.Experts`),
   for 1, 16 and 64 tokens (benchmarks/moe.py);
7. the sampler's choice per NFE over Nano's vocabulary: logits copied to the host and predicted there vs
   predicted on the GPU with only ids and confidences copied (benchmarks/predict.py).

    python scripts/gpu_check.py               # on a CUDA machine with mamba-ssm and causal-conv1d
    python scripts/gpu_check.py --compile     # + a column: the kernel path under --compile
    python scripts/gpu_check.py --sections 1,3  # some sections only (a failing one reports and the next runs)
    python scripts/gpu_check.py --cpu-smoke   # tiny sizes on CPU: checks this script itself
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from twotower_cli import layout
from twotower_cli import sampler as S
from twotower_cli.batching import Continuous, run_in_order
from twotower_cli.config import NemotronHConfig
from twotower_cli.model import moe
from twotower_cli.ops import kernels
from twotower_cli.towers import TowerBackend, TwoTower, capture_graph

ROOT = Path(__file__).resolve().parents[1]

NANO = dict(hidden_size=2688, vocab_size=131072, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
            mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128,
            n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
            moe_shared_expert_intermediate_size=3712, n_shared_experts=1, n_group=1, topk_group=1,
            norm_topk_prob=True, routed_scaling_factor=2.5, intermediate_size=1856, layer_norm_epsilon=1e-5,
            tie_word_embeddings=False, mamba_proj_bias=False, use_conv_bias=True, attention_bias=False,
            mlp_bias=False, eos_token_id=2, bos_token_id=1, pad_token_id=0)
SMOKE = dict(NANO, hidden_size=64, vocab_size=256, num_attention_heads=4, head_dim=16, mamba_num_heads=4,
             mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=16, n_routed_experts=8,
             num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
             intermediate_size=40)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def random_twotower(cfg: NemotronHConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> TwoTower:
    """Built on meta, every tensor created on `device` in its final dtype (fp32 for the spec's fp32 names)."""
    with torch.device("meta"):
        model = TwoTower(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for mod_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in list(getattr(module, kind).items()):
                if t is None:
                    continue
                full = f"{mod_name}.{name}" if mod_name else name
                dt = torch.float32 if layout.keep_fp32(full) or not t.is_floating_point() else dtype
                new = torch.empty(t.shape, device=device, dtype=dt)
                if name == "A_log":
                    new.uniform_(1, 16, generator=g).log_()
                elif name == "dt_bias":  # softplus⁻¹ of dt log-uniform in [1e-3, 1e-1]
                    dt_ = torch.exp(torch.empty(t.shape, device=device).uniform_(math.log(1e-3), math.log(1e-1),
                                                                                 generator=g))
                    new.copy_(dt_ + torch.log(-torch.expm1(-dt_)))
                elif name == "D" or full.endswith("norm.weight") or full.endswith("norm_f.weight"):
                    new.fill_(1.0)
                elif name == "bias" or "e_score_correction_bias" in name:
                    new.zero_()
                elif full.startswith("scale_shift_tables"):
                    new.zero_()[2] = 1.0  # identity time conditioning: rows shift 0, scale 0, gate 1
                elif full.startswith("t_block"):
                    new.zero_()
                elif "conv1d" in full:
                    new.uniform_(-0.5, 0.5, generator=g)
                else:
                    new.normal_(0.0, 0.02, generator=g)
                if kind == "_parameters":
                    module._parameters[name] = nn.Parameter(new, requires_grad=False)
                else:
                    module._buffers[name] = new
    return model.eval()


def timed(fn, device: torch.device, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def one_step_each(backend: TowerBackend, prompt: torch.Tensor, block: int, mask_id: int) -> dict:
    """After a 64-token prefill: {"decode": one decode step, "denoise": one block denoise}, as callables."""
    dev = backend.device
    backend.reset(1)
    backend.extend(prompt[:, :64])
    blk = torch.full((1, block), mask_id, device=dev)
    t = torch.ones(1, device=dev)
    return {"decode": lambda: backend.extend(prompt[:, -1:]), "denoise": lambda: backend.denoise(blk, t)}


def host_syncs(fn) -> int:
    """Synchronizing CUDA calls in one call of `fn`, counted with CUDA's sync debug mode (each is a point
    where Python waits for the GPU)."""
    fn()  # warm: first calls may probe or autotune
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@torch.no_grad()
def per_step(backend: TowerBackend, prompt: torch.Tensor, block: int, mask_id: int, measure,
             cuda_only: bool = True) -> dict | str:
    """{"decode": measure(fn), "denoise": measure(fn)} for one decode step and one block denoise after a
    64-token prefill (`one_step_each`), on CUDA (or anywhere, without `cuda_only`); the cache is reset
    afterwards. A string says why there is no number: off CUDA, or the first exception, a finding rather
    than the end of the check."""
    if cuda_only and backend.device.type != "cuda":
        return "n/a off CUDA"
    out = {}
    try:
        for name, fn in one_step_each(backend, prompt, block, mask_id).items():
            out[name] = measure(fn)
    except Exception as e:  # noqa: BLE001 - e.g. a profiler without CUPTI, a capture that is not safe
        first = (str(e).strip().splitlines() or [""])[0][:240]
        return f"n/a ({type(e).__name__}: {first})" + (f"; measured before it: {out}" if out else "")
    finally:
        backend.reset(1)
    return out


def gpu_launches(fn) -> int:
    """GPU activities (kernels, copies, fills) of one call of `fn`, from torch.profiler's CUDA trace: what
    `benchmarks/dispatch.py`'s "cuda" rows estimate on a CPU (which count each mamba-ssm call as one launch;
    its chunk scan is several Triton kernels)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    fn()  # warm: first calls may probe, autotune or fill caches
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def host_profile(fn, top: int = 8) -> str:
    """Where the host's time goes in one call of `fn` (cProfile, after two warm calls; the final synchronize
    included, so time the host spends waiting for the GPU shows as `synchronize`): the total, then the `top`
    functions by their own time, as name (file:line) ms/calls. For a step whose eager time is far above its
    CUDA-graph replay, this names the Python that costs it."""
    import cProfile
    import pstats

    wait = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    fn()
    wait()
    prof = cProfile.Profile()
    prof.enable()
    fn()
    wait()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) → (primitive calls, calls, own s, cumulative s, callers)
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return f"total {total * 1e3:.1f} ms: " + "; ".join(
        f"{name} ({Path(file).name}:{line}) {own * 1e3:.2f}/{calls}" for (file, line, name), (_, calls, own, _, _) in rows)


def graph_ceiling(fn, replays: int = 20) -> tuple[float, float]:
    """What CUDA graphs could give, as a number for deciding whether to build them: `fn` eager vs captured
    once in a torch.cuda.CUDAGraph and replayed, ms per call (median of `replays`, each synchronised). A
    measurement, not a sampling path: the replays repeat the captured step over the same cache (the Mamba
    states in it advance, the K/V length stays that of the capture), right for timing, wrong for sampling.
    Capture raises at the first operation that is not capture-safe (a host sync, a host-to-device copy), with
    that operation's error (`towers.capture_graph`, the backend's own capture)."""
    side = torch.cuda.Stream()  # warm on a side stream, as capture wants (autotuning, lazy caches)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    dev = torch.device("cuda", torch.cuda.current_device())
    eager = statistics.median(timed(fn, dev, replays))
    replay, _ = capture_graph(fn, dev)
    replayed = statistics.median(timed(replay, dev, replays))
    return eager * 1e3, replayed * 1e3


@torch.no_grad()
def measure_path(backend: TowerBackend, prompt: torch.Tensor, decode: int, blocks: int, block: int,
                 mask_id: int) -> dict[str, float]:
    """prefill tok/s (one prompt), decode tok/s (one token at a time after it), block denoise ms (median)."""
    dev = backend.device
    L = prompt.shape[1]

    def prefill():
        backend.reset(1)
        backend.extend(prompt)

    prefill()  # warm-up: allocator, Triton autotuning / JIT
    t_prefill = min(timed(prefill, dev, 2))
    nxt = prompt[:, -1:]
    for _ in range(3):  # warm the one-token path (under --compile: its graphs for a past of 1, 2, more)
        backend.extend(nxt)
    prefill()
    t_decode = sum(timed(lambda: backend.extend(nxt), dev, decode))
    prefill()
    blk = torch.full((1, block), mask_id, device=dev)
    t = torch.ones(1, device=dev)
    for _ in range(2):  # warm-up
        backend.denoise(blk, t)
    t_block = statistics.median(timed(lambda: backend.denoise(blk, t), dev, blocks))
    return {"prefill_tok_s": L / t_prefill, "decode_tok_s": decode / t_decode, "block_ms": t_block * 1e3}


class SyncedSteps:
    """`backend` with each context step waited for on `device` (`sync`): the sampler's first event, which
    benchmarks/chat.py's `timed_turn` times as the prompt phase, then comes after the prompt has been read,
    not only after its kernels were launched (a GPU runs them asynchronously, and nothing in the sampler
    waits for them before that event)."""

    def __init__(self, backend, device: torch.device):
        self._inner, self._device = backend, device

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def extend(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self._inner.extend(ids, attention_mask)
        sync(self._device)
        return out


def chat_turns(backend: TowerBackend, model: TwoTower, ids: list[int], cfg: S.SamplingConfig, device: torch.device,
               turns: int = 3, new: int = 32) -> str:
    """`twotower chat`'s prompt phase for `turns` turns (each prompt: the last one, its reply and `new` more
    ids): the conversation read again (a fresh state) vs the state kept (`chat.PrefixReuse`), and how many
    replies came out identical (in bf16 a chunked prefill and shorter extends round differently). Context
    steps are waited for (`SyncedSteps`), so the times are the prompt's reading on `device`."""
    import chat as chat_bench  # benchmarks/chat.py

    from twotower_cli.chat import PrefixReuse

    kept, reread = SyncedSteps(PrefixReuse(backend), device), SyncedSteps(TowerBackend(model), device)
    gen = torch.Generator().manual_seed(1)
    parts, same = [], 0
    for _ in range(turns):
        first_re, _, g_re, _ = chat_bench.timed_turn(reread, ids, cfg, [])
        first_kept, _, g, read = chat_bench.timed_turn(kept, ids, cfg, [])
        same += g.token_ids == g_re.token_ids
        parts.append(f"{len(ids)} tok ({read} read) {first_re * 1e3:.1f} → {first_kept * 1e3:.1f}")
        ids = ids + g.token_ids + torch.randint(4, backend.vocab_size, (new,), generator=gen).tolist()
    return f"{', '.join(parts)} · identical replies {same}/{turns}"


def mixed_lengths(backend: TowerBackend, prompts: list[list[int]], cfg: S.SamplingConfig, n_new: int,
                  device: torch.device, width: int = 8) -> str:
    """Requests of mixed lengths (n/8, n/2, n tokens in turn), `width` at a time, as `serve` gets them: fixed
    batches, each running until its longest request is done (the short ones' rows riding along; their
    tokens cut afterwards), vs continuous batching (`batching.run_in_order`: a request takes the place of
    one that ended at the next block; a shorter last block padded in the same forwards). Useful tokens per
    second, one run each."""
    lengths = [(max(1, n_new // 8), max(1, n_new // 2), n_new)[i % 3] for i in range(len(prompts))]
    useful = sum(lengths)
    warm = S.SamplingConfig(**{**cfg.__dict__, "max_new_tokens": max(lengths[:width])})
    S.run(backend, prompts[:width], warm)  # warm-up of both: first calls of new shapes (joins) compile/autotune
    for _ in run_in_order(Continuous(backend, cfg), prompts[:width], width=width, max_new=lengths[:width]):
        pass
    sync(device)
    t0 = time.perf_counter()
    for first in range(0, len(prompts), width):
        longest = max(lengths[first:first + width])
        S.run(backend, prompts[first:first + width], S.SamplingConfig(**{**cfg.__dict__, "max_new_tokens": longest}))
    sync(device)
    fixed = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in run_in_order(Continuous(backend, cfg), prompts, width=width, max_new=lengths):
        pass
    sync(device)
    cont = time.perf_counter() - t0
    return (f"{len(prompts)} requests of {lengths[0]}/{lengths[1]}/{lengths[2]} tokens, {width} at a time "
            f"(mask_diffusion thr 0.8): fixed batches {useful / fixed:.1f} tok/s ({fixed:.2f} s) → continuous "
            f"batching {useful / cont:.1f} tok/s ({cont:.2f} s): {fixed / cont:.2f}×")


T_START = time.perf_counter()


@contextlib.contextmanager
def section(title: str, wanted: set[int], number: int):
    """Prints the section's header (with the seconds since the start) and runs its body, unless it is not in
    `--sections` (then the body is skipped: `with` bodies cannot be skipped, so the caller checks `number in
    wanted` too). An exception ends the section, not the check: its type, message and innermost frames are
    printed and the next section runs, so that one run on a lent GPU says as much as it can."""
    print(f"\n## {number}. {title}  [{time.perf_counter() - T_START:.0f} s]", flush=True)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - reported, then the next section
        frames = traceback.extract_tb(e.__traceback__)[-4:]
        print(f"SECTION {number} FAILED: {type(e).__name__}: {str(e).strip()[:600]}")
        for f in frames:
            print(f"    {Path(f.filename).name}:{f.lineno} in {f.name}: {f.line}")
    finally:
        sys.stdout.flush()


@contextlib.contextmanager
def cudnn_sdpa():
    """The towers' attention as it was before `attention.sdpa_backends`: SDPA choosing among all its backends,
    cuDNN attention included (first on sm90 with torch 2.11; a graph build for every new key length)."""
    from twotower_cli.model import attention

    kept = attention.sdpa_backends
    attention.sdpa_backends = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        attention.sdpa_backends = kept


def warm_then_run(backend: TowerBackend, prompts: list[list[int]], sc: S.SamplingConfig, warm_tokens: int,
                  device: torch.device) -> S.Finished:
    """`S.run` once with `warm_tokens` new tokens (first calls: Triton autotuning, allocator, graph captures),
    then the run that counts, synchronised on both sides."""
    S.run(backend, prompts, S.SamplingConfig(**{**sc.__dict__, "max_new_tokens": warm_tokens}))
    sync(device)
    fin = S.run(backend, prompts, sc)
    sync(device)
    return fin


def cuda_graph_rows(backend: TowerBackend, ids: list[list[int]], block: int, n_new: int,
                    device: torch.device) -> str:
    """`--cuda-graphs` (`TowerBackend.graphs`): mask_diffusion at 4 and 8 fixed steps per block and ar, eager
    vs replayed from CUDA graphs over the fixed-size key/value buffers (the denoiser's steps, the block
    commits and the decode steps; the warm-up run captures them, the timed run replays); tok/s from one run
    each after a warm-up, and whether the tokens agree (else how many first ones do: in bf16 the steps over
    the buffers attend over every column with a mask, another SDPA kernel than the eager step's, and random
    weights' greedy choices are near-ties, so the two can part after some tokens; the `gpu` tests compare
    the logits themselves)."""
    parts = []
    for steps in (4, 8, 0):
        sc = (S.SamplingConfig(mode="mask_diffusion", block_size=block, steps=steps, policy="topk",
                               max_new_tokens=n_new) if steps else S.SamplingConfig(mode="ar", max_new_tokens=n_new))
        got = {}
        for graphs in (False, True):
            backend.graphs = graphs
            fin = warm_then_run(backend, ids, sc, 2 * block, device)  # warm-up: two blocks, so two captures
            got[graphs] = (fin.new_tokens / fin.wall_seconds, fin.generations[0].token_ids)
        backend.graphs = False
        (eager, t0), (graphed, t1) = got[False], got[True]
        same = next((i for i, (a, b) in enumerate(zip(t0, t1, strict=False)) if a != b), min(len(t0), len(t1)))
        parts.append(f"{f'{steps} steps' if steps else 'ar'} {eager:.1f} → {graphed:.1f} tok/s "
                     f"({graphed / eager:.2f}×, tokens "
                     + ("equal)" if t0 == t1 else f"DIFFER after the first {same} of {len(t0)})"))
    return (f"cuda graphs, mask_diffusion and ar, eager → --cuda-graphs ({backend.captures} captures): "
            + ", ".join(parts))


@contextlib.contextmanager
def stand_in_capture():
    """Off CUDA (`--cpu-smoke`): `towers.capture_graph` replaced by a stand-in with a CUDA graph's contract, as
    in tests/test_graphs.py: the step runs now, and each replay runs it again over the same input buffers into
    the same output tensor. Exercises `cuda_graph_rows` and the backend's graph bookkeeping, not a capture."""
    from twotower_cli import towers

    def capture(fn, device, after_warmup=None):  # no warm-up run here: nothing to undo
        out = fn()

        def replay():
            out.copy_(fn())
        return replay, out

    kept = towers.capture_graph, towers.GRAPH_DEVICES
    towers.capture_graph, towers.GRAPH_DEVICES = capture, {"cuda", "cpu"}
    try:
        yield
    finally:
        towers.capture_graph, towers.GRAPH_DEVICES = kept


def run_tests(timeout: float, workers: int) -> None:
    """pytest -m gpu, its output streamed (one line per test: a timeout still leaves what had finished). With
    `workers` > 0 (pytest-xdist), the tests' first calls compile and autotune their Triton kernels in that many
    processes at once, on the machine's cores, instead of one after another."""
    cmd = [sys.executable, "-m", "pytest", "-v", "--tb=short", "--no-header", "--durations=8", "-m", "gpu",
           "tests/test_kernels.py", "tests/test_train.py", "-p", "no:cacheprovider"]
    if workers > 0:
        cmd += ["-n", str(workers)]
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    # In a process group of its own: at the timeout the whole group is stopped, pytest's xdist workers and
    # the torchrun of the FSDP test too. Killing pytest alone left them running on the GPU (the workers until
    # they notice, a torchrun until its job ends) beside the sections timed after this one.
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        status = f"exit {proc.wait(timeout=timeout)}"
    except subprocess.TimeoutExpired:
        stop_group(proc)
        status = f"TIMED OUT after {timeout:.0f} s (--test-timeout)"
    except BaseException:  # Ctrl-C: the tests go too
        stop_group(proc)
        raise
    print(f"({status}, {time.perf_counter() - t0:.0f} s)", flush=True)


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """End the process group that `proc` leads: SIGTERM (torchrun's agent then stops its ranks), up to `grace`
    seconds for its processes to go, then SIGKILL for any left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and group_alive(proc):
            time.sleep(0.1)
        if not group_alive(proc):
            break
    proc.wait()


def group_alive(proc: subprocess.Popen) -> bool:
    """Whether a process of `proc`'s group is still running (the leader is reaped here; on Linux, zombies
    whose parent has not reaped them do not count)."""
    proc.poll()
    pgid = proc.pid
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    if not Path("/proc/self/stat").exists():
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, ...
            return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (checks the script itself)")
    ap.add_argument("--pattern", default="MEMEM*E", help="layers (default: the first 7 of Nano's pattern)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens for prefill (default 1024; smoke 40)")
    ap.add_argument("--decode", type=int, default=None, help="decode steps timed (default 64; smoke 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per ar / mask_diffusion run (default 64)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu first (section 1)")
    ap.add_argument("--test-workers", type=int, default=None,
                    help="pytest-xdist processes for section 1 (default 8 where xdist is installed, else 0)")
    ap.add_argument("--sections", default="1-7", help="which sections to run, e.g. 1 or 3-4 (default 1-7)")
    ap.add_argument("--test-timeout", type=float, default=None, help="seconds for pytest -m gpu (default 300)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the kernel path under --compile (TowerBackend.compile; adds its compile time)")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    t_start = T_START

    if smoke:  # tiny tensors: intra-op threads only add synchronisation (350x slower on a busy 2-core box)
        torch.set_num_threads(1)
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu-smoke to check the script on CPU")
    dtype = torch.float32 if smoke else torch.bfloat16
    prompt_len = args.prompt or (40 if smoke else 1024)
    n_decode = args.decode or (8 if smoke else 64)
    n_new = args.new_tokens or (16 if smoke else 64)
    block = 16

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"# twotower GPU check · {name} · torch {torch.__version__} · python {platform.python_version()}")
    k = kernels.available(kernels.MAMBA) or kernels.available(kernels.CONV)
    versions = []
    for dist in ("mamba-ssm", "causal-conv1d", "triton"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found = importlib.util.find_spec(dist.replace("-", "_")) is not None
            versions.append(f"{dist} {'(no metadata)' if found else '-'}")
    print(f"kernels: {kernels.describe()}\nrouted experts ({str(dtype).removeprefix('torch.')}): "
          f"{moe.describe(device, dtype)}\nversions: {' · '.join(versions)}")

    sys.path.insert(0, str(ROOT / "benchmarks"))  # chat.py, attention.py, moe.py, predict.py
    wanted = parse_sections(args.sections) - ({1} if args.skip_tests else set())
    if 1 in wanted:
        with section("kernel tests", wanted, 1):
            xdist = importlib.util.find_spec("xdist") is not None
            run_tests(args.test_timeout or (60 if smoke else 300),
                      args.test_workers if args.test_workers is not None else (8 if xdist and not smoke else 0))

    model = backend = None
    cfg = NemotronHConfig.build(args.pattern, **(SMOKE if smoke else NANO))
    if wanted & {2, 3, 4}:
        with section(f"model: pattern {args.pattern}", wanted, 2):
            t0 = time.perf_counter()
            model = random_twotower(cfg, device, dtype)
            sync(device)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"{n_params / 1e9:.3f} B parameters (both towers) · {dtype} · built in "
                  f"{time.perf_counter() - t0:.1f} s")
            backend = TowerBackend(model)
    mask_id = 3
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(4, cfg.vocab_size, (1, prompt_len), generator=gen).to(device)

    # The kernel path runs in auto mode: a kernel that fails falls back to torch with a warning (listed below)
    # rather than ending the run. The smoke run's second column is SDPA on CPU (exercises this code path).
    paths = [("torch", dict(kernels="torch", sdpa=False))]
    paths.append(("kernels", dict(kernels="auto", sdpa=True)) if device.type == "cuda"
                 else ("sdpa (cpu)", dict(kernels="torch", sdpa=True)))
    cols = [lbl for lbl, _ in paths]
    best = dict(paths[-1][1])
    if 3 in wanted and backend is not None:
        with section(f"torch path vs kernel path · prompt {prompt_len} · decode {n_decode} steps · block {block}"
                     + ("" if k or device.type != "cuda" else "  (kernels missing: the kernel column is SDPA only)"),
                     wanted, 3):
            results = {}
            n_blocks = 3 if smoke else 10
            if device.type == "cuda":  # the baseline of the cuDNN change: SDPA's own backend choice
                with kernels.force(**best), cudnn_sdpa():
                    results["kernels, any SDPA"] = measure_path(backend, prompt, n_decode, n_blocks, block, mask_id)
                cols.insert(1, "kernels, any SDPA")
            for label, force in paths:
                with kernels.force(**force):
                    results[label] = measure_path(backend, prompt, n_decode, n_blocks, block, mask_id)
            # --cuda-graphs: decode steps and block denoises replayed (after measure_path's warm-up steps);
            # off CUDA through the stand-in capture, which only checks that the column can be made
            backend.graphs = True
            try:
                with (kernels.force(**best),
                      stand_in_capture() if device.type != "cuda" else contextlib.nullcontext()):
                    results[cols[-1] + "+graphs"] = measure_path(backend, prompt, n_decode, n_blocks, block, mask_id)
                cols.append(cols[-1] + "+graphs")
            finally:
                backend.graphs = False
            if args.compile:  # in place: from here on (section 4 too) the decode and block steps run compiled
                t0 = time.perf_counter()
                backend.compile()
                with kernels.force(**paths[-1][1]):
                    results[paths[-1][0] + "+compile"] = measure_path(backend, prompt, n_decode, n_blocks, block,
                                                                      mask_id)
                cols.append(paths[-1][0] + "+compile")
                print(f"(--compile: compilation and timing {time.perf_counter() - t0:.0f} s)")
            w = max(14, *(len(c) + 2 for c in cols))
            print(f"{'':24}" + "".join(f"{c:>{w}}" for c in cols)
                  + "".join(f"{'× ' + cols[0]:>12}" for c in cols[1:]))
            for key, title, higher in (("prefill_tok_s", "prefill tok/s", True),
                                       ("decode_tok_s", "decode tok/s", True),
                                       ("block_ms", "block denoise ms", False)):
                vals = [results[c][key] for c in cols]
                line = f"{title:24}" + "".join(f"{v:{w}.1f}" for v in vals)
                line += "".join(f"{(v / vals[0] if higher else vals[0] / v):11.2f}×" for v in vals[1:])
                print(line)

    rows = [("ar", S.SamplingConfig(mode="ar", max_new_tokens=n_new)),
            ("mask_diffusion thr 0.8", S.SamplingConfig(mode="mask_diffusion", block_size=block, threshold=0.8,
                                                        max_new_tokens=n_new)),
            ("mask_diffusion 4 steps", S.SamplingConfig(mode="mask_diffusion", block_size=block, steps=4,
                                                        policy="topk", max_new_tokens=n_new))]
    ids = [prompt[0, :min(prompt_len, 256)].tolist()]
    if 4 in wanted and backend is not None:
        with section(f"sampling on the {cols[-1]} path · prompt {len(ids[0])} · {n_new} new tokens · greedy · "
                     "no EOS stop (random weights)", wanted, 4):
            sampling(backend, model, prompt, ids, rows, best, block, mask_id, n_new, args.pattern, device)
    del model, backend
    if 5 in wanted:
        with section("attention with grouped keys/values: previous SDPA dispatch vs _sdpa (benchmarks/attention.py)",
                     wanted, 5):
            import attention as attention_bench
            attention_bench.run(device, 64 if smoke else 4096, rounds=1 if smoke else 5)
    if 6 in wanted:
        with section("MoE routed experts: per-expert loop vs grouped GEMMs (benchmarks/moe.py)", wanted, 6):
            import moe as moe_bench
            if smoke:
                moe_bench.run(device, dtype, 64, 32, experts=8, top_k=2, tokens=(1, 16), rounds=1, inner=2)
            else:
                moe_bench.run(device, dtype, NANO["hidden_size"], NANO["moe_intermediate_size"], rounds=5, inner=20)
    if 7 in wanted:
        with section("the sampler's choice per NFE: logits to the host vs predicted on the device "
                     "(benchmarks/predict.py)", wanted, 7):
            import predict as predict_bench
            predict_bench.run(device, vocab=NANO["vocab_size"] if not smoke else 256, rounds=1 if smoke else 5)
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda"
            else "n/a off CUDA")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s · peak GPU memory {peak}")


def parse_sections(spec: str) -> set[int]:
    """"1-7", "1,3-4" → the section numbers."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def sampling(backend: TowerBackend, model: TwoTower, prompt: torch.Tensor, ids: list[list[int]], rows, best: dict,
             block: int, mask_id: int, n_new: int, pattern: str, device: torch.device) -> None:
    """Section 4: ar vs mask_diffusion rows, mixed lengths, chat turns, per-step syncs / launches / graphs."""
    print(f"{'mode':26}{'tok/s':>10}{'NFE':>8}{'tok/NFE':>10}{'seconds':>10}")
    # the same rows for 8 different prompts at once (what `serve --max-batch` and `generate --batch-size` run):
    # tok/s of the whole batch, NFE of the batch, tok/NFE per sequence
    prompt_len = prompt.shape[1]
    window = max(1, min(128, prompt_len - 8))
    batch = [prompt[0, i:i + window].tolist() for i in range(8)]  # 8 different prompts: shifted windows
    with kernels.force(**best):
        for label, sc in rows + [(f"{lbl} × 8", sc) for lbl, sc in rows[:2]]:
            prompts = batch if label.endswith("× 8") else ids
            fin = warm_then_run(backend, prompts, sc, min(n_new, 16), device)
            n = fin.new_tokens
            per_seq = n / max(sum(g.nfe for g in fin.generations), 1)
            print(f"{label:26}{n / fin.wall_seconds:10.1f}{fin.nfe:8d}{per_seq:10.2f}{fin.wall_seconds:10.2f}",
                  flush=True)
        print(mixed_lengths(backend, batch * 3, rows[1][1], n_new, device), flush=True)
        with stand_in_capture() if device.type != "cuda" else contextlib.nullcontext():
            graphs = cuda_graph_rows(backend, ids, block, n_new, device)
        print(graphs + (" (stand-in capture off CUDA: bookkeeping only)" if device.type != "cuda" else ""),
              flush=True)
    with kernels.force(**best):
        print("chat, prompt phase ms re-read → kept (benchmarks/chat.py): "
              + chat_turns(backend, model, prompt[0].tolist(), rows[1][1], device), flush=True)
    for title, measure, show in (
            ("host syncs per step (CUDA sync debug mode)", host_syncs, str),
            (f"GPU activities per step (profiler; benchmarks/dispatch.py --pattern {pattern} estimates them "
             "on a CPU)", gpu_launches, str),
            ("CUDA-graph ceiling, ms per step eager → replayed", graph_ceiling,
             lambda eg: f"{eg[0]:.2f} → {eg[1]:.2f} ({eg[0] / eg[1]:.2f}×)"),
            ("host time per step, torch path (cProfile: own ms/calls)", host_profile, str),
            ("host time per step, kernel path (cProfile: own ms/calls)", host_profile, str)):
        force = dict(kernels="torch", sdpa=False) if "torch path" in title else best
        with kernels.force(**force):
            got = per_step(backend, prompt, block, mask_id, measure, cuda_only=measure is not host_profile)
        sep = "\n  " if measure is host_profile else ", "
        print(f"{title}: " + (sep.join(f"{k} {show(v)}" for k, v in got.items()) if isinstance(got, dict) else got),
              flush=True)
    print(f"kernel fallbacks: {kernels._failed or 'none'} · grouped GEMM fallbacks: {moe._GROUPED_FAILED or 'none'}")

if __name__ == "__main__":
    main()
