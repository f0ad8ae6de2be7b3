"""ops/kernels.py: selection (env override, forcing, probe failures caught, nothing imported at package import),
the wrappers' argument conventions against CPU stand-ins that follow the kernels' documented contracts,
the CPU small-L conv, the SDPA attention path against the explicit one; and, with `-m gpu` on a CUDA machine
with mamba-ssm and causal-conv1d, the real kernels against the torch reference.

The stand-ins (`fake_*`) implement the public reference semantics of the kernels (mamba_ssm's
`selective_state_update_ref`, `rms_norm_ref`, causal-conv1d's `causal_conv1d_ref` / `causal_conv1d_update_ref`
and the C++ layout checks, mamba_chunk_scan_combined's shapes and its chunk states kept in C's dtype), including
their in-place writes, so a wrapper that forgets a clone, a transpose or an expand fails here on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_config, build_tiny_model, max_diff
from twotower_cli.errors import TwoTowerError
from twotower_cli.model import Attention, KVCache, Mamba2Mixer, MambaState
from twotower_cli.model.norm import GatedGroupRMSNorm, RMSNorm
from twotower_cli.ops import kernels
from twotower_cli.ops.ssd import ssd_chunked, ssd_sequential, ssd_step


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- CPU stand-ins

def fake_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                    cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
                    return_varlen_states=False):
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    assert dt.shape == (b, L, h) and A.shape == (h,) and B.shape == (b, L, g, n) and C.shape == B.shape
    assert initial_states is None or initial_states.shape == (b, h, p, n)
    assert D is None or D.shape in ((h,), (h, p))
    assert z is None and seq_idx is None and cu_seqlens is None and not return_varlen_states
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    dt = F.softplus(dt) if dt_softplus else dt
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    init = None if initial_states is None else initial_states.to(C.dtype).float()  # chunk states in C's dtype
    y, final = ssd_sequential(x.float(), dt, A.float(), B.float(), C.float(), chunk_size, init)
    if D is not None:
        y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x.float()
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


def _launch(*args):
    return args


def fake_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                      state_batch_indices=None):
    """mamba-ssm 2.3.2's selective_state_update: its shape asserts, then the launch's argument expressions
    (copied as expressions: `dt_bias.stride(-1)` and the starred D strides fail on None), then the math."""
    b, h, p, n = state.shape
    assert x.shape == (b, h, p) and dt.shape == x.shape and A.shape == (h, p, n)
    g = B.shape[1]
    assert h % g == 0 and B.shape == (b, g, n) and C.shape == B.shape
    assert D is None or D.shape == (h, p)
    assert z is None or z.shape == x.shape
    assert dt_bias is None or dt_bias.shape == (h, p)
    assert state_batch_indices is None
    tie_hdim = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0
    _launch(*(dt_bias.stride(0), dt_bias.stride(1)) if dt_bias is not None else 0, tie_hdim)
    _launch(*(D.stride(0), D.stride(1)) if D is not None else 0)
    dt = dt + dt_bias
    dt = F.softplus(dt) if dt_softplus else dt
    r = h // g
    # the kernel loads x, dt, B, C, D as fp32 and computes in fp32, whatever their dtypes
    x, dt, D = x.float(), dt.float(), D.float()
    Bh, Ch = B.float().repeat_interleave(r, dim=1), C.float().repeat_interleave(r, dim=1)
    dA = torch.exp(dt[..., None] * A)
    state.copy_(state * dA + (dt[..., None] * Bh[:, :, None, :]) * x[..., None])
    out = torch.einsum("bhpn,bhn->bhp", state.float(), Ch) + x * D
    if z is not None:
        out = out * F.silu(z)
    return out.to(x.dtype)


def fake_conv_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                 final_states_out=None, activation=None):
    b, c, L = x.shape
    width = weight.shape[-1]
    assert weight.shape == (c, width) and seq_idx is None and not return_final_states
    assert bias is None or bias.dtype == weight.dtype
    if initial_states is not None:  # csrc/causal_conv1d.cpp
        assert x.stride(1) == 1 and x.stride(2) > 1, "initial_states is only supported for channel last layout"
        assert c % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
        assert initial_states.shape == (b, c, width - 1) and initial_states.stride(1) == 1
        assert initial_states.dtype == x.dtype
        xx = torch.cat([initial_states, x], dim=-1).to(weight.dtype)
        out = F.conv1d(xx, weight[:, None], bias, groups=c)
    else:
        out = F.conv1d(x.to(weight.dtype), weight[:, None], bias, padding=width - 1, groups=c)[..., :L]
    return (F.silu(out) if activation == "silu" else out).to(x.dtype)


def fake_conv_update(x, conv_state, weight, bias=None, activation=None):
    b, c = x.shape
    width = weight.shape[-1]
    assert conv_state.shape == (b, c, width), "older causal-conv1d builds need state_len == width"
    assert conv_state.dtype == x.dtype
    new = torch.cat([conv_state, x[..., None]], dim=-1).to(weight.dtype)
    conv_state.copy_(new[..., -width:])
    out = F.conv1d(new, weight[:, None], bias, groups=c)[..., -1]
    return (F.silu(out) if activation == "silu" else out).to(x.dtype)


def fake_rmsnorm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    assert bias is None and not norm_before_gate
    xf = x.float() * F.silu(z.float())
    grouped = xf.unflatten(-1, (-1, group_size))
    out = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    return out.to(x.dtype)


FAKE_MAMBA = dict(chunk_scan=fake_chunk_scan, state_update=fake_state_update, rmsnorm=fake_rmsnorm)
FAKE_CONV = dict(conv_fn=fake_conv_fn, conv_update=fake_conv_update)


def install_fakes(monkeypatch, mamba=True, conv=True):
    def missing(name):
        def importer():
            raise ImportError(f"No module named {name!r}")
        return importer

    monkeypatch.setattr(kernels, "_import_mamba", (lambda: FAKE_MAMBA) if mamba else missing("mamba_ssm"))
    monkeypatch.setattr(kernels, "_import_conv", (lambda: FAKE_CONV) if conv else missing("causal_conv1d"))


@pytest.fixture
def fake_kernels(monkeypatch):
    """The wrappers run on CPU against the stand-ins; every op of the model takes the kernel branch."""
    kernels._reset_probe()
    install_fakes(monkeypatch)
    monkeypatch.setattr(kernels, "use_kernels", lambda t, family=kernels.MAMBA: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a wrapper bug must fail here, not fall back to torch quietly
        yield
    kernels._reset_probe()


# ------------------------------------------------------------------------------------------- selection

def test_package_import_does_not_import_the_kernels():
    code = ("import twotower_cli, twotower_cli.model, twotower_cli.towers, twotower_cli.ops.kernels, sys; "
            "bad = [m for m in ('mamba_ssm', 'causal_conv1d', 'triton') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("exc", [ImportError("no module"), OSError("libcudart.so: cannot open"), RuntimeError("x")])
def test_probe_catches_any_exception_and_caches(monkeypatch, exc):
    kernels._reset_probe()
    calls = []

    def broken():
        calls.append(1)
        raise exc

    monkeypatch.setattr(kernels, "_import_mamba", broken)
    monkeypatch.setattr(kernels, "_import_conv", broken)
    try:
        k = kernels.probe()
        assert kernels.probe() is k and len(calls) == 2, "the probe must be cached (one import per family)"
        assert k.chunk_scan is None and k.conv_fn is None
        for family in kernels.FAMILIES:
            assert not kernels.available(family) and type(exc).__name__ in kernels.unavailable_reason(family)
            assert not kernels.use_kernels(torch.zeros(1), family)
        assert "mamba-ssm no" in kernels.describe() and "causal-conv1d no" in kernels.describe()
    finally:
        kernels._reset_probe()


ON_GPU = SimpleNamespace(is_cuda=True, device="cuda:0")  # all use_kernels reads of a tensor


def test_env_override(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.setenv(kernels.ENV, "torch")
    assert not kernels.use_kernels(t) and not kernels.use_sdpa(t)
    monkeypatch.setenv(kernels.ENV, "bogus")
    with pytest.raises(TwoTowerError, match="TWOTOWER_KERNELS"):
        kernels.use_kernels(t)
    monkeypatch.setenv(kernels.ENV, "cuda")
    kernels._reset_probe()
    install_fakes(monkeypatch, mamba=False, conv=False)
    try:
        with pytest.raises(TwoTowerError, match="on cpu"):
            kernels.use_kernels(t)  # the device is the first problem to report
        for family in kernels.FAMILIES:  # whichever op asks first, every missing family is named
            with pytest.raises(TwoTowerError, match="the mamba-ssm and causal-conv1d kernels do not import"):
                kernels.use_kernels(ON_GPU, family)
        install_fakes(monkeypatch)
        kernels._reset_probe()
        assert all(kernels.use_kernels(ON_GPU, family) for family in kernels.FAMILIES)
    finally:
        kernels._reset_probe()


def test_families_are_probed_separately(monkeypatch):
    """mamba-ssm without causal-conv1d (the usual partial install): the scan family is there, the conv is not;
    auto uses what is there, and TWOTOWER_KERNELS=cuda names the missing one only for the conv."""
    kernels._reset_probe()
    install_fakes(monkeypatch, conv=False)
    try:
        assert kernels.available(kernels.MAMBA) and not kernels.available(kernels.CONV)
        assert kernels.probe().chunk_scan is fake_chunk_scan and kernels.probe().conv_fn is None
        assert "causal_conv1d" in kernels.unavailable_reason(kernels.CONV)
        assert kernels.unavailable_reason(kernels.MAMBA) == ""
        assert kernels.describe().startswith("mamba-ssm yes · causal-conv1d no")
        monkeypatch.delenv(kernels.ENV, raising=False)
        assert kernels.use_kernels(ON_GPU, kernels.MAMBA) and not kernels.use_kernels(ON_GPU, kernels.CONV)
        assert not kernels.use_kernels(torch.zeros(1), kernels.MAMBA)  # auto on CPU: torch
        monkeypatch.setenv(kernels.ENV, "cuda")
        assert kernels.use_kernels(ON_GPU, kernels.MAMBA)
        with pytest.raises(TwoTowerError, match=r"the causal-conv1d kernels do not import \(causal-conv1d: "):
            kernels.use_kernels(ON_GPU, kernels.CONV)
        with pytest.raises(ValueError):
            kernels.available("flash")
    finally:
        kernels._reset_probe()


def test_summary_names_the_families_in_use(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    try:
        for mamba, conv, expected in ((True, True, "mamba-ssm + causal-conv1d"), (True, False, "mamba-ssm"),
                                      (False, False, "none (plain torch)")):
            kernels._reset_probe()
            install_fakes(monkeypatch, mamba=mamba, conv=conv)
            assert kernels.summary() == expected
        monkeypatch.setenv(kernels.ENV, "torch")
        assert kernels.summary() == "torch (TWOTOWER_KERNELS=torch)"
    finally:
        kernels._reset_probe()


def test_auto_is_torch_on_cpu_and_force_beats_env(monkeypatch):
    kernels._reset_probe()
    install_fakes(monkeypatch)
    t = torch.zeros(1)
    try:
        monkeypatch.delenv(kernels.ENV, raising=False)
        assert kernels.mode() == "auto" and not kernels.use_kernels(t) and not kernels.use_sdpa(t)
        monkeypatch.setenv(kernels.ENV, "cuda")
        with kernels.force(kernels="torch", sdpa=True):
            assert not kernels.use_kernels(t) and kernels.use_sdpa(t)
        with pytest.raises(TwoTowerError):
            kernels.use_kernels(t)  # back to the environment after the block
    finally:
        kernels._reset_probe()


def test_failing_kernel_falls_back_once_in_auto_and_raises_in_cuda_mode(monkeypatch):
    kernels._reset_probe()
    monkeypatch.delenv(kernels.ENV, raising=False)

    def bad(*a):
        raise RuntimeError("triton: unsupported shape")

    try:
        with pytest.warns(UserWarning, match="unsupported shape"):
            assert kernels.call("op", bad, lambda *a: "torch", 1) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.call("op", bad, lambda *a: "torch", 1) == "torch"  # no second warning
        with kernels.force(kernels="cuda"), pytest.raises(RuntimeError):
            kernels.call("other", bad, lambda *a: "torch")
    finally:
        kernels._reset_probe()


# ------------------------------------------------------------------------------------------- wrappers on stand-ins

def scan_inputs(b, L, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, L, h, p, generator=gen), torch.rand(b, L, h, generator=gen) * 0.3,
            -torch.rand(h, generator=gen) * 3 - 0.2, torch.randn(b, L, g, n, generator=gen),
            torch.randn(b, L, g, n, generator=gen))


@pytest.mark.parametrize("L", [1, 5, 16, 130])
@pytest.mark.parametrize("seeded", [False, True])
def test_ssd_chunked_wrapper(fake_kernels, L, seeded):
    x, dt, A, B, C = scan_inputs(2, L, 4, 8, 2, 16)
    init = randn(2, 4, 8, 16, seed=3) if seeded else None
    before = None if init is None else init.clone()
    y, s = kernels.ssd_chunked(x, dt, A, B, C, 128, init)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 128, init)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert max_diff(y, y_ref) <= 1e-4 and max_diff(s, s_ref) <= 1e-4
    assert init is None or torch.equal(init, before)


def test_seeded_scan_runs_in_fp32_with_bf16_inputs(fake_kernels):
    """The stand-in keeps chunk states in C's dtype like the kernel: bf16 C would round the seed state."""
    x, dt, A, B, C = scan_inputs(1, 5, 4, 8, 2, 16)
    init = randn(1, 4, 8, 16, seed=4) * 100 + 0.3
    y, s = kernels.ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 128, init)
    y_ref, s_ref = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 128, init)
    assert max_diff(y, y_ref) <= 1e-3 and max_diff(s, s_ref) <= 1e-3


@pytest.mark.parametrize("fused", [False, True])
def test_ssd_step_wrapper_does_not_mutate_state(fake_kernels, fused):
    x, dt, A, B, C = scan_inputs(3, 1, 4, 8, 2, 16)
    state = randn(3, 4, 8, 16, seed=5)
    before = state.clone()
    skip = dict(D=randn(4, seed=6), dt_bias=randn(4, seed=7)) if fused else {}
    y, s = kernels.ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0].bfloat16(), C[:, 0].bfloat16(), **skip)
    y_ref, s_ref = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0].bfloat16(), C[:, 0].bfloat16(), **skip)
    assert torch.equal(state, before), "ssd_step wrapper wrote into its input state"
    assert y.dtype == s.dtype == torch.float32
    assert max_diff(y, y_ref) <= 1e-5 and max_diff(s, s_ref) <= 1e-5


@pytest.mark.parametrize("L", [5, 130])
@pytest.mark.parametrize("seeded", [False, True])
def test_ssd_chunked_wrapper_applies_dt_bias_and_d(fake_kernels, L, seeded):
    x, dt, A, B, C = scan_inputs(2, L, 4, 8, 2, 16)
    init = randn(2, 4, 8, 16, seed=3) if seeded else None
    skip = dict(D=randn(4, seed=6), dt_bias=randn(4, seed=7))
    y, s = kernels.ssd_chunked(x, dt - 1, A, B, C, 128, init, **skip)
    y_ref, s_ref = ssd_chunked(x, dt - 1, A, B, C, 128, init, **skip)
    assert max_diff(y, y_ref) <= 1e-4 and max_diff(s, s_ref) <= 1e-4


@pytest.mark.parametrize("L", [1, 3, 7])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv_wrapper(fake_kernels, L, with_state):
    cfg = build_tiny_config("M")
    mixer = build_tiny_model(cfg).backbone.layers[0].mixer
    xBC = randn(2, L, cfg.conv_dim, seed=6)
    state = randn(2, cfg.conv_dim, cfg.conv_kernel, seed=7) if with_state else None
    before = None if state is None else state.clone()
    out, new = kernels.causal_conv(xBC, state, mixer.conv1d.weight, mixer.conv1d.bias)
    out_ref, new_ref = mixer._conv_torch(xBC, state)
    assert max_diff(out, out_ref) <= 1e-6 and torch.equal(new, new_ref)
    assert state is None or torch.equal(state, before), "conv wrapper wrote into the conv state"


def test_gated_norm_wrapper(fake_kernels):
    norm = GatedGroupRMSNorm(64, 4)
    with torch.no_grad():
        norm.weight.normal_()
    y, z = randn(3, 5, 64, seed=8), randn(3, 5, 64, seed=9).bfloat16()
    got = kernels.gated_rmsnorm(y, z, norm.weight, 4, norm.eps)
    assert got.dtype == torch.bfloat16 and torch.equal(got, norm._torch(y, z))


@pytest.mark.parametrize("pattern", ["M*EM-E"])
def test_tower_with_kernel_stand_ins_equals_torch(fake_kernels, pattern):
    """Every Mamba op through the kernel branch (prefill, one-token decode, 5-token extensions shorter than
    chunk_size, the denoiser-style seeded read) gives the torch numbers; nothing writes back input states."""
    cfg = build_tiny_config(pattern, chunk_size=8)
    model = build_tiny_model(cfg, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kernels.force(sdpa=False):
        ref = model(ids)
        cache = model.make_cache(2)
        parts = [model(ids[:, :11], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(11, 14)]
        parts.append(model(ids[:, 14:19], cache=cache))
    assert max_diff(torch.cat(parts, dim=1), ref) <= 1e-4


def test_model_decode_updates_its_own_cache_in_place(fake_kernels, monkeypatch):
    """A one-token step of the model with its cache lets the kernels update the cache's Mamba tensors in place
    (no copies); a snapshot taken before is untouched, and the torch ops from it reach the same state."""
    cfg = build_tiny_config("M*M", chunk_size=8)
    model = build_tiny_model(cfg, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kernels.force(sdpa=False):
        cache = model.make_cache(2)
        model(ids[:, :9], cache=cache)
        snap = cache.clone()
        mamba = [i for i, c in enumerate(cache.layers) if isinstance(c, MambaState)]
        kept = [(snap.layers[i].conv.clone(), snap.layers[i].ssm.clone()) for i in mamba]
        before = [(cache.layers[i].conv.data_ptr(), cache.layers[i].ssm.data_ptr()) for i in mamba]
        out = [model(ids[:, t:t + 1], cache=cache) for t in range(9, 12)]
        assert [(cache.layers[i].conv.data_ptr(), cache.layers[i].ssm.data_ptr()) for i in mamba] == before
        for i, (conv, ssm) in zip(mamba, kept, strict=True):  # the snapshot did not move with the cache
            assert torch.equal(snap.layers[i].conv, conv) and torch.equal(snap.layers[i].ssm, ssm)
            assert not torch.equal(cache.layers[i].ssm, ssm)
        monkeypatch.setattr(kernels, "use_kernels", lambda t, family=kernels.MAMBA: False)
        ref = [model(ids[:, t:t + 1], cache=snap) for t in range(9, 12)]
    assert max_diff(torch.cat(out, 1), torch.cat(ref, 1)) <= 1e-5
    for i in mamba:  # (earlier layers' stand-ins round differently: the raw columns differ by float error)
        assert max_diff(cache.layers[i].conv, snap.layers[i].conv) <= 1e-5
        assert max_diff(cache.layers[i].ssm, snap.layers[i].ssm) <= 1e-5


@pytest.mark.parametrize("L", [1, 5, 20])
def test_mixer_seeded_with_stand_ins_equals_torch(fake_kernels, monkeypatch, L):
    """The denoiser's use: a block (1, 5 < chunk_size 8, 20 > it) seeded with a context state, read only."""
    cfg = build_tiny_config("M", chunk_size=8)
    mixer = build_tiny_model(cfg, std=0.1).backbone.layers[0].mixer
    seed = MambaState(randn(2, cfg.conv_dim, cfg.conv_kernel, seed=1), randn(2, 4, 16, 8, seed=2))
    keep = seed.clone()
    x = randn(2, L, cfg.hidden_size, seed=3)
    with torch.no_grad():
        out, st = mixer(x, seed)
        monkeypatch.setattr(kernels, "use_kernels", lambda t, family=kernels.MAMBA: False)
        ref, ref_st = mixer(x, seed)
    assert torch.equal(seed.conv, keep.conv) and torch.equal(seed.ssm, keep.ssm)
    assert max_diff(out, ref) <= 1e-5 and max_diff(st.ssm, ref_st.ssm) <= 1e-5
    assert torch.equal(st.conv, ref_st.conv)


@pytest.mark.parametrize("only", [kernels.MAMBA, kernels.CONV])
def test_mixer_with_one_family_uses_it_and_torch_for_the_other(fake_kernels, monkeypatch, only):
    """The mixer asks per op: with one family available, that family's ops take the kernel branch (the other
    family's wrappers must not be reached) and the numbers equal torch for prefill and decode."""
    cfg = build_tiny_config("M", chunk_size=8)
    mixer = build_tiny_model(cfg, std=0.1).backbone.layers[0].mixer
    x = randn(2, 12, cfg.hidden_size, seed=4)
    with torch.no_grad(), kernels.force(kernels="torch"):
        ref, ref_st = mixer(x[:, :11])
        ref_step, _ = mixer(x[:, 11:], ref_st)

    def must_not_run(*a, **k):
        raise AssertionError("a kernel of the unavailable family was called")

    used = []
    monkeypatch.setattr(kernels, "use_kernels", lambda t, family=kernels.MAMBA: used.append(family) or family == only)
    other = ("causal_conv",) if only == kernels.MAMBA else ("ssd_chunked", "ssd_step", "gated_rmsnorm")
    for name in other:
        monkeypatch.setattr(kernels, name, must_not_run)
    with torch.no_grad():
        out, st = mixer(x[:, :11])
        step, _ = mixer(x[:, 11:], st)
    assert set(used) == set(kernels.FAMILIES)
    assert max_diff(out, ref) <= 1e-5 and max_diff(step, ref_step) <= 1e-5


def _write_package(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


_TRITON_ONLY = {  # mamba-ssm as MAMBA_SKIP_CUDA_BUILD=TRUE installs it: the __init__ needs the CUDA extension
    "mamba_ssm/__init__.py": "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn\n",
    "mamba_ssm/ops/__init__.py": "",
    "mamba_ssm/ops/selective_scan_interface.py": "import selective_scan_cuda\n",
    "mamba_ssm/ops/triton/__init__.py": "",
    "mamba_ssm/ops/triton/ssd_combined.py": "from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn\n"
                                            "def mamba_chunk_scan_combined(*a, **k): return 'scan'\n",
    "mamba_ssm/ops/triton/selective_state_update.py": "def selective_state_update(*a, **k): return 'step'\n",
    "mamba_ssm/ops/triton/layernorm_gated.py": "def rmsnorm_fn(*a, **k): return 'norm'\n",
}


def _probe_in_subprocess(site, code):
    env = {**__import__("os").environ, "PYTHONPATH": f"{site}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    pre = "import sys; from twotower_cli.ops import kernels; k = kernels.probe(); "
    subprocess.run([sys.executable, "-c", pre + code], check=True, env=env)


def test_mamba_ssm_without_its_cuda_extension_gives_the_triton_kernels(tmp_path):
    _write_package(tmp_path, _TRITON_ONLY)
    _probe_in_subprocess(tmp_path, (
        "assert kernels.available(kernels.MAMBA), kernels.unavailable_reason(kernels.MAMBA); "
        "assert (k.chunk_scan(), k.state_update(), k.rmsnorm()) == ('scan', 'step', 'norm'); "
        "assert 'selective_scan_cuda' in k.mamba_note and 'triton kernels only' in kernels.describe(); "
        "assert not kernels.available(kernels.CONV)"))


def test_mamba_ssm_that_imports_normally_is_used_as_is(tmp_path):
    _write_package(tmp_path, {**_TRITON_ONLY, "mamba_ssm/__init__.py": "__version__ = '9'\n"})
    _probe_in_subprocess(tmp_path, "assert k.chunk_scan() == 'scan' and k.mamba_note == ''; "
                                   "assert sys.modules['mamba_ssm'].__version__ == '9'")


def test_mamba_ssm_without_triton_reports_the_missing_piece_and_leaves_no_stub(tmp_path):
    files = dict(_TRITON_ONLY)
    files["mamba_ssm/ops/triton/selective_state_update.py"] = "import triton_not_here\n"
    _write_package(tmp_path, files)
    _probe_in_subprocess(tmp_path, (
        "assert not kernels.available(kernels.MAMBA); "
        "assert 'triton_not_here' in kernels.unavailable_reason(kernels.MAMBA), kernels.unavailable_reason(); "
        "assert 'mamba_ssm' not in sys.modules"))


# ------------------------------------------------------------------------------------------- CPU conv, SDPA

@pytest.mark.parametrize("L", [1, 2, 5, 16])
def test_conv_window_equals_conv1d(L):
    c, K = 24, 4
    window, w, bias = randn(3, c, K - 1 + L), randn(c, 1, K, seed=1), randn(c, seed=2)
    ref = F.conv1d(window, w, bias, groups=c)
    assert max_diff(kernels.conv_window(window, w, bias), ref) <= 1e-6
    assert max_diff(kernels.conv_window(window, w, None), F.conv1d(window, w, None, groups=c)) <= 1e-6


def _attention(cfg, seed=0):
    att = Attention(cfg)
    with torch.no_grad():
        for p in att.parameters():
            p.copy_(randn(*p.shape, seed=seed) * 0.2)
            seed += 1
    return att


SDPA_CASES = ["prefill", "decode", "extend", "pads", "bidirectional", "bidirectional_mask", "train_block"]


def sdpa_case(case: str, cfg, b: int = 2) -> tuple[int, KVCache | None, bool, torch.Tensor | None]:
    """(L, past, causal, mask) of one attention call as the towers make it."""
    d, kv = cfg.attention_head_dim, cfg.num_key_value_heads
    L, T, causal, mask = 6, 7, True, None
    if case == "prefill":
        T = 0
    if case == "decode":
        L = 1
    if case == "pads":  # left pads: rows 0-1 of sequence 0 are pads, fully masked as queries
        valid = torch.ones(b, T + L, dtype=torch.bool)
        valid[0, :T + 2] = False
        q = torch.arange(L)[:, None] + T
        mask = (torch.arange(T + L)[None] <= q)[None, None] & valid[:, None, None, :]
    if case.startswith("bidirectional"):
        causal = False
        if case == "bidirectional_mask":
            mask = torch.ones(b, 1, L, T + L, dtype=torch.bool)
            mask[1, ..., :3] = False
    if case == "train_block":  # the training forward: every block of 96 noisy tokens at once
        from twotower_cli.train import block_attention_mask
        L = T = 96
        causal, mask = False, block_attention_mask(L, 16)[None, None]
    past = KVCache(randn(b, kv, T, d, seed=11), randn(b, kv, T, d, seed=12)) if T else None
    return L, past, causal, mask


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records (q heads, k heads, q length, has mask, enable_gqa, dtype) of every SDPA call. Returns the output
    in the layout CUDA's fused kernels give it, [b, heads, L, d] values with L-major strides (not contiguous):
    on an H100 a `.view` of that raised where the CPU's contiguous output did not."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((q.shape[1], k.shape[1], q.shape[2], attn_mask is not None, enable_gqa, q.dtype))
        out = real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                   enable_gqa=enable_gqa)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


# How each case reaches SDPA (TINY: 4 query heads on 2 key/value heads, so rep 2): grouped keys/values only
# into flash attention (half precision, no mask); elsewhere the query heads packed onto the key/value heads
# (short L) or the keys/values expanded (causal prefill, long L).
SDPA_ROUTE = {
    ("prefill", torch.bfloat16): "gqa", ("prefill", torch.float32): "expand",
    ("decode", torch.bfloat16): "gqa", ("decode", torch.float32): "pack",
    ("bidirectional", torch.bfloat16): "gqa", ("bidirectional", torch.float32): "pack",
    **{(c, dt): "pack" for c in ("extend", "pads", "bidirectional_mask") for dt in (torch.bfloat16, torch.float32)},
    **{("train_block", dt): "expand" for dt in (torch.bfloat16, torch.float32)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_path_equals_explicit_math(case, dtype, sdpa_calls):
    """Same numbers as the explicit fp32 path, and never `enable_gqa` with a mask or in fp32 (SDPA's math
    backend on CUDA: scores [b, h, L, T] in fp32)."""
    cfg, att, x, (L, past, causal, mask), ref = explicit_attention(case)
    assert not sdpa_calls
    got = attention_via_sdpa(att, x, past, causal, mask, dtype)
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    assert len(sdpa_calls) == 1
    q_heads, k_heads, q_len, has_mask, gqa, call_dtype = sdpa_calls[0]
    route = ("gqa" if gqa else "pack" if (q_heads, k_heads, q_len) == (kv, kv, L * h // kv)
             else "expand" if (q_heads, k_heads, q_len) == (h, h, L) else "?")
    assert route == SDPA_ROUTE[case, dtype], sdpa_calls
    assert not gqa or (not has_mask and call_dtype == torch.bfloat16)
    assert has_mask == (mask is not None or (causal and L > 1 and past is not None))
    assert torch.isfinite(got).all()
    assert max_diff(got, ref) <= sdpa_tolerance(dtype, ref), f"{case}: max diff {max_diff(got, ref):.2e}"


def explicit_attention(case: str):
    """(cfg, the tiny attention, its input, the call (L, past, causal, mask), the explicit fp32 output)."""
    cfg = build_tiny_config("*")
    att = _attention(cfg)
    call = sdpa_case(case, cfg)
    L, past, causal, mask = call
    x = randn(2, L, cfg.hidden_size, seed=13)
    with torch.no_grad(), kernels.force(sdpa=False):
        ref = att(x, past, causal=causal, mask=mask)[0]
    return cfg, att, x, call, ref


def attention_via_sdpa(att, x, past, causal, mask, dtype) -> torch.Tensor:
    """The same call on the SDPA path with the module, input and cache in `dtype`; output in fp32."""
    half = KVCache(past.k.to(dtype), past.v.to(dtype)) if past is not None else None
    with torch.no_grad(), kernels.force(sdpa=True):
        return att.to(dtype)(x.to(dtype), half, causal=causal, mask=mask)[0].float()


def sdpa_tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2 * (1 + ref.abs().max().item())


def mem_efficient_standin(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The arithmetic of PyTorch's memory-efficient CUDA kernel (mem_eff_attention/kernel_forward.h) for a
    mask: fp32 scores times the scale, plus the bias, times log2(e) before the row maximum, exp2 against it;
    a row whose maximum is -inf has nothing to sum (0/0)."""
    assert not enable_gqa and not is_causal and q.shape[1] == k.shape[1] and dropout_p == 0.0
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s + attn_mask.float()
    s = s * 1.4426950408889634
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp2(s - torch.where(m == float("-inf"), 0.0, m))
    return ((p @ v.float()) / p.sum(dim=-1, keepdim=True)).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_mask_value_keeps_padded_rows_finite_in_mem_efficient_kernel(dtype, monkeypatch):
    """Left-pad queries see no key at all. Through the memory-efficient kernel's arithmetic they must still
    give the explicit path's finite average (with the dtype's minimum as the mask value they come out NaN,
    which the Mamba layers would carry into the real tokens)."""
    _, att, x, (L, past, causal, mask), ref = explicit_attention("pads")
    monkeypatch.setattr(F, "scaled_dot_product_attention", mem_efficient_standin)
    got = attention_via_sdpa(att, x, past, causal, mask, dtype)
    assert not mask[0, 0, :2].any() and torch.isfinite(got).all()
    assert max_diff(got, ref) <= sdpa_tolerance(dtype, ref)


def test_model_with_sdpa_equals_explicit_left_padded():
    cfg = build_tiny_config("M*EM-E")
    model = build_tiny_model(cfg, std=0.1)
    ids = torch.randint(4, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 9, dtype=torch.bool)
    am[0, :3] = False
    outs = []
    for sdpa in (False, True):
        with torch.no_grad(), kernels.force(sdpa=sdpa):
            cache = model.make_cache(2)
            a = model(ids[:, :7], cache=cache, attention_mask=am[:, :7])
            b = model(ids[:, 7:8], cache=cache)
            c = model(ids[:, 8:], cache=cache)
        outs.append(torch.cat([a, b, c], dim=1))
    assert max_diff(outs[0], outs[1]) <= 1e-5


# ------------------------------------------------------------------------------------------- GPU: real kernels

@contextlib.contextmanager
def fallbacks_fail():
    """In auto mode a kernel that fails (or disagrees on short seeded blocks) falls back to torch with a
    warning: make those warnings, and only those, errors."""
    with warnings.catch_warnings():
        for text in ("kernel failed", "disagrees with the torch scan"):
            warnings.filterwarnings("error", message=f".*{text}")
        yield


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: Triton's interpreter (tests/triton_interpret.py)


@pytest.fixture(autouse=True)
def _kernel_test_setup(request, monkeypatch):
    """For `gpu` tests: exact fp32 torch references (no TF32 in cuBLAS / cuDNN: the torch path is the
    reference, the kernels' own TF32 is what the tolerances allow for); under Triton's interpreter, the CPU
    counts as the kernels' device."""
    if "gpu" not in request.keywords:
        yield
        return
    if DEV == "cpu":
        monkeypatch.setattr(kernels, "use_kernels",
                            lambda t, family=kernels.MAMBA: kernels.mode() != "torch" and kernels.available(family))
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _need_kernels(family=kernels.MAMBA):
    if not kernels.available(family):
        pytest.skip(f"{family} not importable: {kernels.unavailable_reason(family)}")


def strict_mode() -> str:
    """The kernel mode for whole-model GPU tests: every kernel that imports, errors propagating
    (TWOTOWER_KERNELS=cuda); without causal-conv1d, auto, so that the conv stays in torch."""
    return "cuda" if kernels.available(kernels.CONV) else "auto"


NANO = dict(h=64, p=64, g=8, n=128, chunk=128)


def kernel_tower_config():
    """Kernel-friendly sizes (state 64, chunk 64, head dims 64) and no MoE layer: the kernels do not touch
    the MoE, and its top-k routing turns rounding differences into a different expert for a token whose
    k-th and (k+1)-th scores nearly tie. Seen with "M*EM-E" in bf16 under Triton's interpreter: one token
    of 600 routed differently, its logits 0.48 off; with TF32 scan products on a GPU it could happen in fp32
    too. Routing is covered on CPU against transformers (test_hf_parity.py)."""
    return build_tiny_config("M*-M--", hidden_size=256, mamba_num_heads=8, mamba_head_dim=64, n_groups=2,
                             ssm_state_size=64, chunk_size=64, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64)


@pytest.mark.gpu
@pytest.mark.parametrize("L,seeded", [(1, True), (5, True), (16, True), (127, True), (300, True), (300, False)])
def test_gpu_chunk_scan_equals_torch(L, seeded):
    """Prefill (L=300 over chunk boundaries) and seeded blocks shorter than chunk_size (1, 5, 16, 127) with a
    non-zero initial state: the field failure. Inputs fp32 where seeded (as the wrapper does)."""
    _need_kernels()
    d = NANO
    x, dt, A, B, C = (t.to(DEV) for t in scan_inputs(2, L, d["h"], d["p"], d["g"], d["n"], seed=L))
    init = randn(2, d["h"], d["p"], d["n"], seed=99).to(DEV) if seeded else None
    before = None if init is None else init.clone()
    y, s = kernels._kernel_scan(x, dt, A, B, C, d["chunk"], init)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, d["chunk"], init)
    scale = 1 + y_ref.abs().max().item()
    assert max_diff(y, y_ref) <= 2e-3 * scale, f"y: {max_diff(y, y_ref):.3e} (scale {scale:.1f})"
    assert max_diff(s, s_ref) <= 2e-3 * (1 + s_ref.abs().max().item()), f"state: {max_diff(s, s_ref):.3e}"
    assert init is None or torch.equal(init, before)
    assert kernels._short_seeded_ok(x.device)


@pytest.mark.gpu
def test_gpu_state_update_equals_torch():
    _need_kernels()
    d = NANO
    x, dt, A, B, C = (t.to(DEV) for t in scan_inputs(3, 1, d["h"], d["p"], d["g"], d["n"], seed=5))
    state = randn(3, d["h"], d["p"], d["n"], seed=6).to(DEV)
    before = state.clone()
    y, s = kernels.ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    y_ref, s_ref = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    assert torch.equal(state, before)
    assert max_diff(y, y_ref) <= 1e-3 * (1 + y_ref.abs().max().item()) and max_diff(s, s_ref) <= 1e-4
    # raw dt with dt_bias (softplus in the kernel) and the D skip, B and C in bf16 as the mixer passes them
    skip = dict(D=randn(d["h"], seed=7).to(DEV), dt_bias=(randn(d["h"], seed=8) - 3).to(DEV))
    raw, Bb, Cb = (dt[:, 0] - 0.5).bfloat16(), B[:, 0].bfloat16(), C[:, 0].bfloat16()
    y, s = kernels.ssd_step(state, x[:, 0], raw, A, Bb, Cb, **skip)
    y_ref, s_ref = ssd_step(state, x[:, 0], raw, A, Bb, Cb, **skip)
    assert torch.equal(state, before)
    assert max_diff(y, y_ref) <= 1e-3 * (1 + y_ref.abs().max().item()) and max_diff(s, s_ref) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("L,seeded", [(16, True), (300, False)])
def test_gpu_chunk_scan_applies_dt_bias_and_d(L, seeded):
    """The kernel's own softplus(dt + dt_bias) and D skip (a denoiser block, a prompt) vs the torch op."""
    _need_kernels()
    d = NANO
    x, dt, A, B, C = (t.to(DEV) for t in scan_inputs(2, L, d["h"], d["p"], d["g"], d["n"], seed=L))
    init = randn(2, d["h"], d["p"], d["n"], seed=99).to(DEV) if seeded else None
    skip = dict(D=randn(d["h"], seed=7).to(DEV), dt_bias=(randn(d["h"], seed=8) - 3).to(DEV))
    raw = (dt - 0.5).bfloat16()
    y, s = kernels._kernel_scan(x, raw, A, B, C, d["chunk"], init, **skip)
    y_ref, s_ref = ssd_chunked(x, raw, A, B, C, d["chunk"], init, **skip)
    scale = 1 + y_ref.abs().max().item()
    assert max_diff(y, y_ref) <= 2e-3 * scale, f"y: {max_diff(y, y_ref):.3e} (scale {scale:.1f})"
    assert max_diff(s, s_ref) <= 2e-3 * (1 + s_ref.abs().max().item()), f"state: {max_diff(s, s_ref):.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 5, 16, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_causal_conv_equals_torch(L, dtype):
    _need_kernels(kernels.CONV)
    c, K = 6144, 4
    w, bias = (randn(c, 1, K, seed=1) * 0.3).to(DEV, dtype), randn(c, seed=2).to(DEV, dtype)
    xBC = randn(2, L, c, seed=3).to(DEV, dtype)
    state = randn(2, c, K, seed=4).to(DEV, dtype)
    before = state.clone()
    conv = torch.nn.Conv1d(c, c, K, groups=c).to(DEV, dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(bias)
    cfg = build_tiny_config("M")
    mixer = Mamba2Mixer(cfg)
    mixer.conv1d, mixer.conv_dim, mixer.kernel = conv, c, K
    out, new = kernels.causal_conv(xBC, state, conv.weight, conv.bias)
    out_ref, new_ref = mixer._conv_torch(xBC, state)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.equal(state, before) and torch.equal(new, new_ref)
    assert max_diff(out, out_ref) <= tol * (1 + out_ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gated_norm_equals_torch(dtype):
    _need_kernels()
    norm = GatedGroupRMSNorm(4096, 8).to(DEV)
    with torch.no_grad():
        norm.weight.normal_()
    y, z = randn(2, 7, 4096, seed=1).to(DEV), randn(2, 7, 4096, seed=2).to(DEV, dtype)
    got = kernels.gated_rmsnorm(y, z, norm.weight, 8, norm.eps)
    ref = norm._torch(y, z)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and max_diff(got, ref) <= tol * (1 + ref.abs().max().item())


@pytest.mark.gpu
def test_gpu_rms_norm_bf16_rounds_once():
    """RMSNorm of a bf16 model hands bf16 input and weight to F.rms_norm (one fused kernel on CUDA): its result
    is NVIDIA's fp32 formula, weight multiply included, rounded once to bf16."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    norm = RMSNorm(2688).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(randn(2688, seed=3))
    norm.to(torch.bfloat16)
    x = (randn(4, 16, 2688, seed=1) * 4).to(DEV, torch.bfloat16)
    got = norm(x)
    xf = x.float()
    once = (norm.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps))).bfloat16()
    assert got.dtype == torch.bfloat16
    assert (got != once).float().mean().item() <= 0.01  # rounding the normalised x first misses ~25%


@pytest.mark.gpu
def test_gpu_sampling_noise_is_drawn_on_the_gpu_and_seeded(monkeypatch):
    """Temperature sampling on CUDA logits draws its [.., V] uniforms there, from a generator seeded once from
    the caller's CPU generator: the same seed gives the same tokens, draws advance, another seed differs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from twotower_cli import sampler as S

    cfg = S.SamplingConfig(temperature=0.8)
    logits = torch.randn(1, 16, 4096, generator=torch.Generator().manual_seed(0)).to("cuda")
    drawn = []
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: drawn.append(torch.device(k.get("device") or "cpu"))
                        or real(*a, **k))

    def two_draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [S.predict(logits, cfg, g, 3)[0] for _ in range(2)]

    a, b = two_draws(1), two_draws(1)
    assert all(d.type == "cuda" for d in drawn) and len(drawn) == 4
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1]) and not torch.equal(two_draws(2)[0], a[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tower_kernels_equal_torch(dtype):
    """A small tower with kernel-friendly sizes: prefill, 1-token decode and short extensions, kernels + SDPA
    vs the torch reference."""
    _need_kernels()
    cfg = kernel_tower_config()
    model = build_tiny_model(cfg, std=0.05).to(DEV)
    from twotower_cli.model.loading import cast_

    cast_(model, dtype)
    ids = torch.randint(4, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0)).to(DEV)

    def run():
        cache = model.make_cache(2)
        parts = [model(ids[:, :130], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(130, 134)]
        parts.append(model(ids[:, 134:150], cache=cache))
        return torch.cat(parts, dim=1)

    mode = strict_mode()
    with torch.no_grad():
        with kernels.force(kernels="torch", sdpa=False):
            ref = run()
        with kernels.force(kernels=mode, sdpa=True), fallbacks_fail():
            got = run()
    tol = 2e-3 if dtype == torch.float32 else 0.1
    assert max_diff(got, ref) <= tol * (1 + ref.abs().max().item()), f"max diff {max_diff(got, ref):.3e}"


def _denoise_run(dtype, device, seed=0, compiled=False):
    """A TwoTower with kernel-friendly sizes: context prefill over chunk boundaries, one decode step, a
    committed block, then denoiser blocks (seeded Mamba, bidirectional attention over the context) with
    and without time conditioning. Returns every logits tensor, on the CPU in fp32. `compiled`: under
    `TowerBackend.compile()` (--compile; the 150-token prefill stays eager, the rest is compiled)."""
    from tests.twotower_helpers import twotower_tensors

    from twotower_cli.model.loading import cast_
    from twotower_cli.towers import TowerBackend, TwoTower

    cfg = kernel_tower_config()
    model = TwoTower(cfg)
    model.load_state_dict(twotower_tensors(build_tiny_model(cfg, seed=seed, std=0.05), "random",
                                           denoiser=build_tiny_model(cfg, seed=seed + 1, std=0.05)))
    cast_(model.to(device).eval(), dtype)
    backend = TowerBackend(model)
    if compiled:
        backend.compile()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, cfg.vocab_size, (2, 150), generator=g).to(device)
    block = torch.randint(4, cfg.vocab_size, (2, 16), generator=g).to(device)
    masks = torch.full((2, 16), 3, device=device)
    with torch.no_grad():
        backend.reset(2)
        outs = [backend.extend(prompt), backend.extend(prompt[:, :1])]
        outs.append(backend.denoise(masks, torch.tensor([0.3, 0.8], device=device)))
        outs.append(backend.extend(block))
        outs.append(backend.denoise(masks, None))
    return [o.float().cpu() for o in outs]


def test_denoise_run_is_deterministic_on_cpu():
    """The GPU comparison below needs a run that depends only on its inputs: same seed, same numbers."""
    a, b = _denoise_run(torch.float32, "cpu"), _denoise_run(torch.float32, "cpu")
    assert len(a) == 5 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[2], a[4]), "time conditioning must change the denoiser's output"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,compiled", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_gpu_twotower_denoise_kernels_equal_torch(dtype, compiled):
    """The denoiser's use of the kernels (seeded scan of a 16-token block < chunk_size, conv from the
    context's columns, SDPA over context ‖ block) against the eager torch path, logits compared. `compiled`:
    under --compile, where the compiled regions reach the kernels through graph breaks (prepare_compile)."""
    _need_kernels()
    mode = strict_mode()
    with kernels.force(kernels="torch", sdpa=False):
        ref = _denoise_run(dtype, DEV)
    with kernels.force(kernels=mode, sdpa=True), fallbacks_fail():
        got = _denoise_run(dtype, DEV, compiled=compiled)
    tol = 2e-3 if dtype == torch.float32 else 0.1
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert max_diff(a, b) <= tol * (1 + b.abs().max().item()), f"output {i}: max diff {max_diff(a, b):.3e}"


def eager_and_graphed(dtype: torch.dtype, seed: int, cfg=None):
    """(cfg, eager backend, backend with graphs) over one random TwoTower of `cfg` (`kernel_tower_config`) on
    CUDA."""
    from tests.twotower_helpers import twotower_tensors

    from twotower_cli.model.loading import cast_
    from twotower_cli.towers import TowerBackend, TwoTower

    cfg = cfg or kernel_tower_config()
    model = TwoTower(cfg)
    model.load_state_dict(twotower_tensors(build_tiny_model(cfg, seed=seed, std=0.05), "random",
                                           denoiser=build_tiny_model(cfg, seed=seed + 1, std=0.05)))
    cast_(model.to("cuda").eval(), dtype)
    eager, graphed = TowerBackend(model), TowerBackend(model)
    graphed.graphs = True
    return cfg, eager, graphed


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_cuda_graph_denoise_equals_eager(dtype):
    """`--cuda-graphs` on a real GPU: the denoiser step captured at a block's second step and replayed at the
    later ones gives the eager step's logits, for blocks of two rows with their own t and masked rows, across
    a commit (a new capture) and with one row's block padded (`block_valid`); the kernel path as the sampler
    runs it. tests/test_graphs.py checks the rest on the CPU with a stand-in capture."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg, eager, graphed = eager_and_graphed(dtype, seed=5)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(4, cfg.vocab_size, (2, 40), generator=g).cuda()
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 9:] = False
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad(), kernels.force(kernels="auto", sdpa=True), fallbacks_fail(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*capture of the denoiser step failed")
        for b in (eager, graphed):
            b.reset(2)
            b.extend(prompt)
        for block_no, block_valid in enumerate((None, valid)):
            x = torch.full((2, 16), 3)
            for step in range(4):
                t = torch.tensor([1.0 - step / 5, 0.9 - step / 6])
                rows = (torch.rand(2, 16, generator=g) < 0.8) & (valid if block_valid is not None else True)
                want = eager.denoise(x, t, rows=rows, block_valid=block_valid)
                got = graphed.denoise(x, t, rows=rows, block_valid=block_valid)
                scale = 1 + want.abs().max().item()
                assert max_diff(got, want) <= tol * scale, f"block {block_no} step {step}: {max_diff(got, want):.3e}"
                x = x.clone()
                x[:, step * 4:(step + 1) * 4] = torch.randint(4, cfg.vocab_size, (2, 4), generator=g)
            for b in (eager, graphed):
                b.extend(x.cuda())
    assert graphed.captures == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_cuda_graph_decode_equals_eager(dtype, monkeypatch):
    """`--cuda-graphs` on a real GPU, decode: the context tower's one-token step captured over fixed-size
    key/value buffers (the kernels' in-place state updates, the masked SDPA over the buffer) and replayed,
    the buffers doubled and the step captured again when full; two rows, one left-padded. Then
    mask_diffusion's pattern, four blocks of 16: denoiser steps and a commit of 16 tokens (the chunk scan
    and conv kernels from a state, copied back), both graphed over the buffers. Every step's logits and
    the Mamba states against the eager path; the capture's warm-up must leave the states as they were
    (`capture_graph(after_warmup=...)`)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from twotower_cli import towers

    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 16)
    cfg, eager, graphed = eager_and_graphed(dtype, seed=7)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(4, cfg.vocab_size, (2, 12), generator=g).cuda()
    mask = torch.ones(2, 12, dtype=torch.bool, device="cuda")
    mask[1, :5] = False
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad(), kernels.force(kernels="auto", sdpa=True), fallbacks_fail(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*capture of a context step failed")
        for b in (eager, graphed):
            b.reset(2)
            b.extend(prompt, attention_mask=mask)
        for step in range(40):  # 12 + 40 tokens: buffers of 28 columns, then 58
            tok = torch.randint(4, cfg.vocab_size, (2, 1), generator=g).cuda()
            want, got = eager.extend(tok), graphed.extend(tok)
            scale = 1 + want.abs().max().item()
            assert max_diff(got, want) <= tol * scale, f"step {step}: {max_diff(got, want):.3e}"
        assert graphed.captures == 2 and graphed.cache.length == eager.cache.length == 52
        for a, b in zip(graphed.cache.layers, eager.cache.layers, strict=True):
            if hasattr(b, "ssm"):
                assert max_diff(a.ssm, b.ssm) <= tol * (1 + b.ssm.abs().max().item())
        for block_no in range(4):
            x = torch.full((2, 16), 3, device="cuda")
            for step in range(3):
                t = torch.tensor([1.0 - step / 3, 0.9 - step / 4])
                want, got = eager.denoise(x, t), graphed.denoise(x, t)
                scale = 1 + want.abs().max().item()
                assert max_diff(got, want) <= tol * scale, f"block {block_no} step {step}: {max_diff(got, want):.3e}"
                x = x.clone()
                x[:, step * 5:(step + 1) * 5] = torch.randint(4, cfg.vocab_size, (2, 5), generator=g).cuda()
            want, got = eager.extend(x), graphed.extend(x)
            assert max_diff(got, want) <= tol * (1 + want.abs().max().item()), f"commit {block_no}"
    # 2 decode captures; block 0's denoiser step over the buffers (1); its commit does not fit them: remade
    # with 136 columns, run uncaptured; block 1 captures the denoiser step (1) and its commit (1); blocks 2
    # and 3 replay both (the same run on the CPU with a stand-in capture counts 2, 3, 5, 5, 5)
    assert graphed.captures == 5 and graphed.cache.length == 52 + 64


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_moe_layers_as_they_run(monkeypatch):
    """`--cuda-graphs` over towers with MoE layers, as Nano's, in bf16 (the grouped GEMM route, with no host
    sync; fp32 takes the per-expert loop, which reads the routing on the host and cannot be captured): every
    context step (decode, commits) and denoiser step is captured, none refused, and each replay gives what
    the same step gives run directly over the same buffers: a second backend whose capture runs the step
    instead of capturing it. Against that reference rather than the eager path, the comparison does not
    hinge on the routing of a token whose experts nearly tie (`kernel_tower_config`)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from twotower_cli import towers

    cfg = build_tiny_config("M*EM-E*M", hidden_size=256, mamba_num_heads=8, mamba_head_dim=64, n_groups=2,
                            ssm_state_size=64, chunk_size=64, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=64, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128)
    cfg, ref, graphed = eager_and_graphed(torch.bfloat16, seed=9, cfg=cfg)
    ref.graphs = True
    real = towers.capture_graph

    def run_instead(fn, device, after_warmup=None):
        fn()
        if after_warmup is not None:
            after_warmup()
        out = fn()
        return (lambda: out.copy_(fn())), out

    capture = {"with": real}
    monkeypatch.setattr(towers, "capture_graph", lambda fn, device, after_warmup=None: capture["with"](
        fn, device, after_warmup=after_warmup))
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 16)

    def both(step, what):
        capture["with"] = real
        got = step(graphed)
        capture["with"] = run_instead
        want = step(ref)
        assert max_diff(got, want) <= 1e-2 * (1 + want.abs().max().item()), f"{what}: {max_diff(got, want):.3e}"

    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(4, cfg.vocab_size, (2, 12), generator=g).cuda()
    mask = torch.ones(2, 12, dtype=torch.bool, device="cuda")
    mask[1, :5] = False
    with torch.no_grad(), kernels.force(kernels="auto", sdpa=True), fallbacks_fail(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*CUDA graph capture of")
        both(lambda b: (b.reset(2), b.extend(prompt, attention_mask=mask))[1], "prompt")
        for step in range(20):
            tok = torch.randint(4, cfg.vocab_size, (2, 1), generator=g).cuda()
            both(lambda b, tok=tok: b.extend(tok), f"decode {step}")
        for block_no in range(3):
            x = torch.full((2, 16), 3, device="cuda")
            for step in range(3):
                t = torch.tensor([1.0 - step / 3, 0.9 - step / 4])
                both(lambda b, x=x, t=t: b.denoise(x, t), f"block {block_no} step {step}")
                x = x.clone()
                x[:, step * 5:(step + 1) * 5] = torch.randint(4, cfg.vocab_size, (2, 5), generator=g).cuda()
            both(lambda b, x=x: b.extend(x), f"commit {block_no}")
    assert graphed.graphs and graphed.captures == ref.captures >= 4


@pytest.mark.gpu
def test_gpu_cuda_graphs_with_a_tower_on_each_of_two_gpus(monkeypatch):
    """`--cuda-graphs` with the context tower on cuda:0 and the denoiser on cuda:1: decode steps and commits
    captured on cuda:0, the denoiser's steps on cuda:1, none refused, every replay's logits the eager
    path's. torch.cuda.graph's own capture stream lives on the device of the first capture; captures on
    the other device must not use it (`towers.capture_graph`)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from twotower_cli import towers

    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 16)
    cfg, eager, graphed = eager_and_graphed(torch.float32, seed=11)
    eager.twotower.place("cuda:0", "cuda:1")
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(4, cfg.vocab_size, (2, 12), generator=g)

    def same(got, want, what):
        assert max_diff(got, want.to(got.device)) <= 1e-4 * (1 + want.abs().max().item()), what

    with torch.no_grad(), kernels.force(kernels="auto", sdpa=True), fallbacks_fail(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*CUDA graph capture of")
        for b in (eager, graphed):
            b.reset(2)
            b.extend(prompt)
        for block_no in range(4):
            x = torch.full((2, 16), 3)
            for step in range(3):
                t = torch.tensor([1.0 - step / 3, 0.9 - step / 4])
                same(graphed.denoise(x, t), eager.denoise(x, t), f"block {block_no} step {step}")
                x = x.clone()
                x[:, step * 5:(step + 1) * 5] = torch.randint(4, cfg.vocab_size, (2, 5), generator=g)
            same(graphed.extend(x), eager.extend(x), f"commit {block_no}")
        for step in range(6):
            tok = torch.randint(4, cfg.vocab_size, (2, 1), generator=g)
            same(graphed.extend(tok), eager.extend(tok), f"decode {step}")
    assert graphed.graphs and graphed.captures >= 6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_stacked_caches_give_each_row_its_own_logits(dtype):
    """Continuous batching on the kernel path: prompts of 150, 37 and 5 tokens read one at a time, their caches
    stacked (left-padded: a masked SDPA, the state-update kernel over rows that never shared a prefill),
    then a block extension, a denoiser block for all rows, blocks of 16, 5 and 9 tokens right-padded to 16
    (`block_valid`: the seeded scan over the padding, which must not reach the valid positions), and,
    after the middle row left (`keep_rows`), one more decode step: each row's logits against its run alone."""
    _need_kernels()
    from tests.twotower_helpers import twotower_tensors

    from twotower_cli.model.cache import TowerCache
    from twotower_cli.model.loading import cast_
    from twotower_cli.towers import TowerBackend, TwoTower

    cfg = kernel_tower_config()
    model = TwoTower(cfg)
    model.load_state_dict(twotower_tensors(build_tiny_model(cfg, seed=0, std=0.05), "random",
                                           denoiser=build_tiny_model(cfg, seed=1, std=0.05)))
    cast_(model.to(DEV).eval(), dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, cfg.vocab_size, (1, n), generator=g).to(DEV) for n in (150, 37, 5)]
    block = torch.randint(4, cfg.vocab_size, (3, 16), generator=g).to(DEV)
    masks, t = torch.full((3, 16), 3, device=DEV), torch.tensor([0.3, 0.8, 0.5], device=DEV)
    tol = 2e-3 if dtype == torch.float32 else 0.1

    def close(got, want, what):
        got, want = got.float().cpu(), want.float().cpu()
        assert max_diff(got, want) <= tol * (1 + want.abs().max().item()), f"{what}: max diff {max_diff(got, want):.3e}"

    with torch.no_grad(), kernels.force(kernels=strict_mode(), sdpa=True), fallbacks_fail():
        alone = [TowerBackend(model) for _ in prompts]
        for b, ids in zip(alone, prompts, strict=True):
            b.reset(1)
            b.extend(ids)
        stacked = TowerBackend(model)
        stacked.cache = TowerCache.stack([b.cache for b in alone])
        close(stacked.extend(block), torch.cat([b.extend(block[i:i + 1]) for i, b in enumerate(alone)]), "extend")
        close(stacked.denoise(masks, t), torch.cat([b.denoise(masks[i:i + 1], t[i:i + 1]) for i, b in enumerate(alone)]),
              "denoise")
        valid = torch.arange(16)[None, :] < torch.tensor([16, 5, 9])[:, None]  # shorter blocks, right-padded
        padded = stacked.denoise(masks, t, block_valid=valid)
        for i, n in enumerate((16, 5, 9)):
            close(padded[i:i + 1, :n], alone[i].denoise(masks[i:i + 1, :n], t[i:i + 1]), f"padded block {i}")
        stacked.keep_rows([0, 2])
        step = block[:, :1]
        close(stacked.extend(step[[0, 2]]), torch.cat([alone[0].extend(step[:1]), alone[2].extend(step[2:])]), "decode")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SDPA_CASES)
def test_gpu_sdpa_equals_explicit(case, dtype, monkeypatch):
    """Nano's attention sizes (32 query heads on 2 key/value heads × 128): every way the towers call attention,
    the SDPA path against the explicit one in the same dtype, forward and (the training block mask)
    backward. On CUDA only the towers' fused backends are allowed (flash, memory-efficient: `sdpa_backends`
    without its last resort): a call that would fall to SDPA's math backend raises. (Restricting them
    around the call is not enough: `Attention._attend` enters `sdpa_backends` itself, whose choice replaces
    the caller's, math included.)"""
    cfg = build_tiny_config("*", num_attention_heads=32, num_key_value_heads=2, head_dim=128, hidden_size=512)
    att = _attention(cfg).to(DEV, dtype)
    L, past, causal, mask = sdpa_case(case, cfg)
    past = None if past is None else KVCache(past.k.to(DEV, dtype), past.v.to(DEV, dtype))
    mask = None if mask is None else mask.to(DEV)
    x = randn(2, L, 512, seed=1).to(DEV, dtype)
    grad = case == "train_block"
    if DEV == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from twotower_cli.model import attention

        monkeypatch.setattr(attention, "sdpa_backends", lambda device: sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]))
    outs = []
    for sdpa in (False, True):
        xi = x.clone().requires_grad_(grad)
        with kernels.force(sdpa=sdpa):
            out = att(xi, past, causal=causal, mask=mask)[0]
            if grad:
                out.float().square().mean().backward()
        outs.append((out.detach().float(), xi.grad.float() if grad else None))
    (ref, ref_grad), (got, got_grad) = outs
    tol = 2e-3 if dtype == torch.float32 else 1.5e-2  # bf16: ~2 ulp of the largest output
    assert max_diff(got, ref) <= tol * (1 + ref.abs().max().item()), f"max diff {max_diff(got, ref):.3e}"
    if grad:
        assert max_diff(got_grad, ref_grad) <= tol * (1 + ref_grad.abs().max().item())


@functools.cache
def _nano_moe_state(cfg) -> dict[str, torch.Tensor]:
    """Random weights for the MoE layer below, drawn once and on the device (1.3 G numbers: seconds on a CPU)."""
    from twotower_cli.model.moe import MoE

    with torch.device(DEV):
        moe = MoE(cfg).requires_grad_(False)
    gen = torch.Generator(DEV).manual_seed(0)
    for p in list(moe.parameters()) + list(moe.buffers()):
        p.copy_(torch.randn(p.shape, generator=gen, device=DEV) * 0.02)
    return moe.state_dict()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_gpu_moe_grouped_experts_equal_the_loop(tokens, monkeypatch):
    """Nano's MoE layer (128 experts of 1856 on 2688, top 6, a 3712 shared expert) in bf16, as the sampler
    runs it (no autograd): the default route, which on CUDA is the grouped GEMM pair with no host sync (CUDA's
    sync debug mode raises on one), against the per-expert loop and an fp32 run of the same weights."""
    from twotower_cli.config import NemotronHConfig
    from twotower_cli.model.moe import _GROUPED_MM, Experts, MoE

    n_experts = 128 if DEV == "cuda" else 16  # the CPU run (Triton interpreter job) keeps Nano's widths only
    cfg = NemotronHConfig.build("E", hidden_size=2688, moe_intermediate_size=1856, n_routed_experts=n_experts,
                                num_experts_per_tok=6, moe_shared_expert_intermediate_size=3712,
                                n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                routed_scaling_factor=2.5, vocab_size=256)
    with torch.device("meta"):
        moe = MoE(cfg, torch.float64)
    moe.load_state_dict(_nano_moe_state(cfg), assign=True)
    # Weights and input rounded to bf16 for the fp32 run too: the same values route the same way (a
    # near-tie top-6 choice must not flip between the runs).
    moe = moe.to(DEV, torch.bfloat16).float().requires_grad_(False)
    x = randn(1, tokens, 2688, seed=tokens).to(DEV, torch.bfloat16).float()
    with torch.no_grad():
        ref = moe(x)  # fp32 activations
        moe.to(torch.bfloat16)
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
        xb = x.to(torch.bfloat16)
        ran = []
        real = Experts._grouped
        monkeypatch.setattr(Experts, "_grouped", lambda self, *a: ran.append("grouped") or real(self, *a))
        if DEV == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = moe(xb)
        finally:
            if DEV == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        monkeypatch.setattr(Experts, "grouped", False)
        loop = moe(xb)
    if DEV == "cuda" and _GROUPED_MM is not None and torch.cuda.get_device_capability()[0] >= 8:
        assert ran == ["grouped"]
    scale = 1 + ref.abs().max().item()
    assert max_diff(got, loop) <= 1.5e-2 * scale, f"grouped vs loop: {max_diff(got, loop):.3e} (scale {scale:.2f})"
    assert max_diff(loop, ref) <= 3e-2 * scale, f"bf16 loop vs fp32: {max_diff(loop, ref):.3e}"
    assert max_diff(got, ref) <= 3e-2 * scale, f"bf16 default vs fp32: {max_diff(got, ref):.3e}"


def test_gpu_check_script_runs_on_cpu():
    """scripts/gpu_check.py --cpu-smoke (tiny sizes, CPU): the one prepared script a lent GPU runs must not rot
    between GPU sessions (each has minutes of device time). Every section prints, and the CUDA-only
    measurements say they did not run rather than inventing numbers; the cProfile host-time rows run on the
    CPU, and the --cuda-graphs rows through a stand-in capture, whose replays must give the eager tokens."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "scripts" / "gpu_check.py"), "--cpu-smoke", "--skip-tests"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    for header in ("## 2. model", "## 3. torch path vs kernel path", "## 4. sampling", "## 5. attention",
                   "## 6. MoE", "## 7. the sampler's choice"):
        assert header in out, header
    for line in ("host syncs per step", "GPU activities per step", "CUDA-graph ceiling"):
        assert any(ln.startswith(line) and ln.endswith("n/a off CUDA") for ln in out.splitlines()), line
    assert out.rstrip().endswith("peak GPU memory n/a off CUDA"), out[-200:]  # was "nan GiB"
    for line in ("host time per step, torch", "host time per step, kernel"):
        lines = out.splitlines()
        i = next(i for i, ln in enumerate(lines) if ln.startswith(line))
        assert " decode total " in lines[i] and lines[i + 1].startswith("  denoise total "), lines[i:i + 2]
    graphs = next(ln for ln in out.splitlines() if ln.startswith("cuda graphs, mask_diffusion and ar"))
    assert int(graphs.split("(", 1)[1].split(" captures)")[0]) > 0 and graphs.count("tokens equal") == 3, graphs
    assert "stand-in capture off CUDA" in graphs, graphs
    assert "kernel fallbacks: none" in out
    assert "sdpa (cpu)+graphs" in out  # section 3's --cuda-graphs column, made with the stand-in capture
    assert "FAILED" not in out, out  # a section that raised is reported and skipped, which must not pass here
    chat = next(ln for ln in out.splitlines() if ln.startswith("chat, prompt phase"))
    assert chat.endswith("identical replies 3/3"), chat  # fp32 on CPU: the kept state changes nothing


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_gpu_check_tests_that_time_out_take_their_child_processes_with_them(tmp_path, monkeypatch, capsys):
    """Section 1 of scripts/gpu_check.py at its --test-timeout: pytest goes, and so do the processes it started
    (xdist workers, the FSDP test's torchrun), which otherwise ran on beside the sections timed after it. A
    stand-in for `python -m pytest ...` that starts a child and waits; after the timeout neither runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test",
                                                  Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    pids = tmp_path / "pids"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nsleep 120 &\necho $! > {pids}\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_check.sys, "executable", str(fake))
    child = None
    try:
        gpu_check.run_tests(timeout=1.0, workers=0)
        child = int(pids.read_text())
        assert "TIMED OUT after 1 s" in capsys.readouterr().out
        assert not _running(child)
    finally:
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)


def test_gpu_check_graph_rows_say_where_the_tokens_part(monkeypatch):
    """scripts/gpu_check.py's --cuda-graphs line compares the greedy tokens of the eager and graphed runs; in
    bf16 on a GPU they may part after some tokens (another attention kernel over the buffers, near-tie
    choices of random weights), so a difference says after how many equal tokens, not only that it differs."""
    import importlib.util

    from twotower_cli import sampler as S

    spec = importlib.util.spec_from_file_location("gpu_check_under_test",
                                                  Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    backend = SimpleNamespace(graphs=False, captures=2)
    eager, graphed = list(range(10, 26)), list(range(10, 21)) + [99] * 5  # part after 11 of 16

    def run(b, prompts, sc, warm, device):
        tokens = (graphed if b.graphs and sc.mode == "ar" else eager)[:sc.max_new_tokens]
        return S.Finished([S.Generation(prompts[0], tokens, "length", len(tokens))], len(tokens), 1.0, sc.mode)

    monkeypatch.setattr(gpu_check, "warm_then_run", run)
    line = gpu_check.cuda_graph_rows(backend, [[5, 6]], 16, 16, torch.device("cpu"))
    assert line.count("tokens equal") == 2 and "ar 16.0 → 16.0 tok/s (1.00×, tokens DIFFER after the first 11 of 16)" in line


def test_gpu_check_chat_turns_time_the_prompt_read_not_its_launch(tmp_path, monkeypatch):
    """scripts/gpu_check.py's chat line times each turn's prompt phase up to the sampler's first event
    (benchmarks/chat.py `timed_turn`). Nothing before that event waits for the GPU, so it timed the launch of
    the prefill's kernels (read again or kept: about the same), not the prefill: each context step is now
    waited for on the device, before the first event of every turn."""
    import importlib.util

    from tests.twotower_helpers import write_random_twotower

    from twotower_cli import sampler as S
    from twotower_cli.towers import TowerBackend, load_model

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", root / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    model = load_model(write_random_twotower(tmp_path / "tt"), need_denoiser=True).twotower
    log = []
    real_extend, real_generate = TowerBackend.extend, S.generate

    def extend(self, *args, **kwargs):
        log.append("extend")
        return real_extend(self, *args, **kwargs)

    def generate(*args, **kwargs):
        log.append("turn")
        for ev in real_generate(*args, **kwargs):
            log.append("event")
            yield ev

    monkeypatch.setattr(TowerBackend, "extend", extend)
    monkeypatch.setattr(S, "generate", generate)
    monkeypatch.setattr(gpu_check, "sync", lambda device: log.append("sync"))
    cfg = S.SamplingConfig(mode="mask_diffusion", block_size=4, steps=4, policy="topk", max_new_tokens=4)
    line = gpu_check.chat_turns(TowerBackend(model), model, [5, 9, 14, 7, 21], cfg, torch.device("cpu"), turns=2,
                                new=3)
    assert line.endswith("identical replies 2/2"), line
    turns = " ".join(log).split("turn")[1:]
    assert len(turns) == 4 and all(t.split("event")[0].split() == ["extend", "sync"] for t in turns), log


def test_sdpa_backends_leave_out_cudnn_on_cuda_only():
    """On CUDA the towers' SDPA calls run with cuDNN attention disabled (it builds a graph per new key length:
    a build every decode step on an H100 with torch 2.11), flash / memory-efficient / math allowed; off CUDA
    the selection is left as it is. The flags are global: checked inside and after the context."""
    from twotower_cli.model.attention import sdpa_backends

    cuda = torch.backends.cuda
    before = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
              cuda.cudnn_sdp_enabled())
    with sdpa_backends(torch.device("cuda", 0)):
        assert (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
                cuda.cudnn_sdp_enabled()) == (True, True, True, False)
    with sdpa_backends(torch.device("cpu")):
        assert (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
                cuda.cudnn_sdp_enabled()) == before
    assert (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
            cuda.cudnn_sdp_enabled()) == before
