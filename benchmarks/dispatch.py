"""Operator dispatches per sampler step: one-token decode vs a 16-token denoiser block, on CPU, with the
routed experts run as a per-expert loop (the baseline) and as grouped GEMMs (`moe.Experts`, the default),
and with the mixers on their torch ops (this CPU's route) or as on CUDA.

On a GPU a batch-1 step of this model is bound by how many kernels Python launches, not by arithmetic;
the count of dispatched operators is the same on CPU and CUDA and needs no GPU to measure. The model has
Nano's routing (128 experts, top 6) and the first 7 layers of its pattern by default, at a small width
(op counts do not depend on it), in bf16 (the GPU's dtype: its casts are operators too). Columns per step:
compute operators dispatched (views, reshapes and other metadata-only ops left out), of which in the MoE
layers, and host syncs (`.tolist()` / `.item()`: on CUDA each waits for the GPU to drain; the loop reads
its per-expert counts so). The grouped rows take the grouped GEMM for any row count, as on CUDA (on the
CPU a decode step would keep the loop).

The "cuda" rows count what a CUDA step launches: attention through SDPA (`kernels.force(sdpa=True)`), and
the mamba-ssm / causal-conv1d kernels replaced by stand-ins of the same signatures that count as one
launch each (their outputs are zeros: only the operators around them, which are twotower's, are real).

    python benchmarks/dispatch.py [--pattern MEMEM*E] [--experts 128] [--top-k 6] [--block 16] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from twotower_cli.config import NemotronHConfig
from twotower_cli.model import moe as moe_module
from twotower_cli.model.moe import Experts, MoE
from twotower_cli.ops import kernels
from twotower_cli.towers import TowerBackend

ROOT = Path(__file__).resolve().parents[1]

METADATA = {"view", "as_strided", "slice", "select", "transpose", "t", "unsqueeze", "squeeze", "expand",
            "reshape", "_unsafe_view", "_reshape_alias", "alias", "detach", "permute", "empty", "empty_strided",
            "resolve_conj", "resolve_neg", "to", "lift_fresh", "matmul", "linear", "contiguous", "split",
            "chunk", "unbind", "narrow", "result_type", "is_nonzero", "item", "_local_scalar_dense",
            "view_as", "expand_as", "flatten", "unflatten", "split_with_sizes", "numpy_T", "type_as"}


def count_ops(fn, calls: int) -> dict[str, float]:
    """Average per call: top-level compute ops, of which inside MoE forwards ("moe" profiler ranges), and
    host syncs."""
    syncs = 0
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def counted(real):
        def call(self, *a, **k):
            nonlocal syncs
            syncs += 1
            return real(self, *a, **k)
        return call

    torch.Tensor.tolist, torch.Tensor.item = counted(real_tolist), counted(real_item)
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
    finally:
        torch.Tensor.tolist, torch.Tensor.item = real_tolist, real_item
    total = moe = 0
    moe_ranges = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.name == "moe"]
    stand_ins = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.name == KERNEL]
    for e in prof.events():
        op = e.name[len("aten::"):] if e.name.startswith("aten::") else None
        if e.name == KERNEL:
            pass  # a stand-in kernel: one launch
        elif (op is None or op in METADATA or _inside_compute_op(e)
              or any(a <= e.time_range.start and e.time_range.end <= b for a, b in stand_ins)):
            continue  # count each compute op once: not the kernels a composite op (linear → addmm) calls
        total += 1
        if any(a <= e.time_range.start and e.time_range.end <= b for a, b in moe_ranges):
            moe += 1
    return {"ops": total / calls, "moe": moe / calls, "syncs": syncs / calls}


KERNEL = "stand-in kernel"


def _launch(fn):
    def wrapped(*a, **k):
        with torch.profiler.record_function(KERNEL):
            return fn(*a, **k)
    return wrapped


def _zeros_scan(x, dt, A, B, C, chunk_size, initial_states=None, return_final_states=False, **_):
    y = torch.zeros_like(x)
    final = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1], dtype=torch.float32)
    return (y, final) if return_final_states else y


STAND_INS = kernels.Kernels(
    chunk_scan=_launch(_zeros_scan),
    state_update=_launch(lambda state, x, *a, **k: torch.zeros_like(x)),
    rmsnorm=_launch(lambda x, weight, bias, z=None, **k: torch.zeros_like(x)),
    conv_fn=_launch(lambda x, weight, bias=None, **k: torch.zeros_like(x)),
    conv_update=_launch(lambda x, conv_state, weight, bias=None, activation=None: torch.zeros_like(x)),
)


@contextlib.contextmanager
def as_on_cuda():
    """SDPA for attention and the stand-in kernels for every mamba-ssm / causal-conv1d op, on CPU tensors."""
    real = kernels.use_kernels
    kernels._reset_probe()
    kernels._probe_result[:] = [STAND_INS, {}]
    kernels._short_ok["cpu"] = True  # seeded blocks shorter than chunk_size take the kernel scan
    kernels.use_kernels = lambda t, family=kernels.MAMBA: True
    try:
        with kernels.force(sdpa=True):
            yield
    finally:
        kernels.use_kernels = real
        kernels._reset_probe()


def _inside_compute_op(e) -> bool:
    parent = e.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") and parent.name[len("aten::"):] not in METADATA:
            return True
        parent = parent.cpu_parent
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="MEMEM*E")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16",
                    help="weights and activations (bf16: the GPU's dtype, whose casts count too)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    cfg = NemotronHConfig.build(args.pattern, **dict(gpu_check.SMOKE, n_routed_experts=args.experts,
                                                     num_experts_per_tok=args.top_k))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = gpu_check.random_twotower(cfg, torch.device("cpu"), dtype)
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    for m in moe_layers:  # mark each MoE forward as a profiler range
        m.forward = _ranged(m.forward)
    backend = TowerBackend(model)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, cfg.vocab_size, (1, args.prompt), generator=g)
    backend.reset(1)
    backend.extend(prompt)
    one = prompt[:, -1:]
    masks = torch.full((1, args.block), 3)
    t = torch.ones(1)
    n_moe = cfg.pattern.count("E")
    print(f"pattern {args.pattern} ({n_moe} MoE layers a tower) · {args.experts} experts, top {args.top_k} · "
          f"context {args.prompt} · {args.dtype} · per step, average of {args.calls}")
    print(f"{'step':22}{'mixers':>8}{'experts':>9}{'ops':>8}{'in MoE':>9}{'host syncs':>12}")
    cpu_rule = moe_module.CPU_ROWS_PER_GROUP
    steps = (("decode (1 token)", lambda: backend.extend(one)),
             (f"denoise block ({args.block})", lambda: backend.denoise(masks, t)))
    for name, fn in steps:
        for mixers, route in (("torch", "loop"), ("torch", "grouped"), ("cuda", "grouped")):
            Experts.grouped = route == "grouped"
            # grouped as on CUDA, where it runs for any row count (the CPU loops below experts / 8 rows)
            moe_module.CPU_ROWS_PER_GROUP = 10**9 if route == "grouped" else cpu_rule
            with as_on_cuda() if mixers == "cuda" else contextlib.nullcontext():
                c = count_ops(fn, args.calls)
            print(f"{name:22}{mixers:>8}{route:>9}{c['ops']:8.0f}{c['moe']:9.0f}{c['syncs']:12.1f}")
    Experts.grouped, moe_module.CPU_ROWS_PER_GROUP = True, cpu_rule


def _ranged(forward):
    def wrapped(*a, **k):
        with torch.profiler.record_function("moe"):
            return forward(*a, **k)
    return wrapped


if __name__ == "__main__":
    main()
