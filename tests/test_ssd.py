"""The chunked SSD scan and the one-step update equal the token-by-token recurrence (issue 2, item 7)."""

from __future__ import annotations

import pytest
import torch

from conftest import max_diff
from twotower_cli.ops.ssd import ssd_chunked, ssd_sequential, ssd_step

CHUNK = 8


def random_inputs(L: int, b: int = 2, h: int = 4, p: int = 16, g: int = 2, n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen)
    dt = torch.rand(b, L, h, generator=gen) * 0.3 + 1e-3  # positive, as after softplus
    A = -torch.rand(h, generator=gen) * 8 - 0.5  # negative
    B = torch.randn(b, L, g, n, generator=gen)
    C = torch.randn(b, L, g, n, generator=gen)
    state = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, state


@pytest.mark.parametrize("L", [0, 1, 7, CHUNK, 3 * CHUNK + 5])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_sequential(L, with_state):
    x, dt, A, B, C, state = random_inputs(L)
    init = state if with_state else None
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, CHUNK, init)
    y, s = ssd_chunked(x, dt, A, B, C, CHUNK, init)
    assert y.shape == y_ref.shape == x.shape and s.shape == state.shape
    assert max_diff(y, y_ref) <= 1e-5, f"outputs differ by {max_diff(y, y_ref):.3g}"
    assert max_diff(s, s_ref) <= 1e-5, f"final states differ by {max_diff(s, s_ref):.3g}"


@pytest.mark.parametrize("g", [1, 4])
def test_group_sharing(g):
    """Head hh reads group hh // (h // g): check against the scan with B, C expanded to one group per head."""
    x, dt, A, B, C, state = random_inputs(13, g=g)
    y, s = ssd_chunked(x, dt, A, B, C, CHUNK, state)
    r = x.shape[2] // g
    y_ref, s_ref = ssd_sequential(x, dt, A, B.repeat_interleave(r, 2), C.repeat_interleave(r, 2), CHUNK, state)
    assert max_diff(y, y_ref) <= 1e-5 and max_diff(s, s_ref) <= 1e-5, f"{max_diff(y, y_ref):.3g}"


def test_split_scan_equals_whole_scan():
    """Scanning a prefix, then the rest from its final state, equals one scan (what cache extension relies on)."""
    x, dt, A, B, C, state = random_inputs(29)
    y, s = ssd_chunked(x, dt, A, B, C, CHUNK, state)
    y1, s1 = ssd_chunked(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], CHUNK, state)
    y2, s2 = ssd_chunked(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], CHUNK, s1)
    assert max_diff(torch.cat([y1, y2], 1), y) <= 1e-5 and max_diff(s2, s) <= 1e-5


def test_step_is_the_recurrence():
    x, dt, A, B, C, state = random_inputs(1)
    y, s = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    Bh, Ch = B[:, 0].repeat_interleave(2, 1), C[:, 0].repeat_interleave(2, 1)  # [b, h, n]
    s_ref = torch.exp(dt[:, 0] * A)[..., None, None] * state + (dt[:, 0, :, None] * x[:, 0])[..., None] * Bh[:, :, None]
    y_ref = (s_ref * Ch[:, :, None]).sum(-1)
    assert max_diff(s, s_ref) <= 1e-6 and max_diff(y, y_ref) <= 1e-5


@pytest.mark.parametrize("L", [1, 7, 3 * CHUNK + 5])
def test_dt_bias_and_d_are_the_softplus_and_the_skip(L):
    """With dt_bias the scan takes raw dt and applies softplus(dt + dt_bias); with D its output has D·x added:
    the spec's steps 4 and 6 (spec §2), done inside the op as mamba-ssm's kernels do."""
    x, dt, A, B, C, state = random_inputs(L, seed=2)
    raw = torch.randn(dt.shape, generator=torch.Generator().manual_seed(3)) * 2
    bias, D = torch.randn(x.shape[2]) * 0.5, torch.randn(x.shape[2])
    soft = torch.nn.functional.softplus(raw + bias)
    y_ref, s_ref = ssd_sequential(x, soft, A, B, C, CHUNK, state)
    y_ref = y_ref + D[:, None] * x
    y, s = ssd_chunked(x, raw, A, B, C, CHUNK, state, D=D, dt_bias=bias)
    tol = 1e-5 * (1 + y_ref.abs().max().item() + s_ref.abs().max().item())
    assert max_diff(y, y_ref) <= tol and max_diff(s, s_ref) <= tol
    y1, s1 = ssd_step(state, x[:, 0], raw[:, 0], A, B[:, 0], C[:, 0], D=D, dt_bias=bias)
    y1_ref, s1_ref = ssd_step(state, x[:, 0], soft[:, 0], A, B[:, 0], C[:, 0])
    assert max_diff(y1, y1_ref + D[:, None] * x[:, 0]) <= 1e-5 and max_diff(s1, s1_ref) <= 1e-6
    # each of the two matters, so the checks above can fail
    assert max_diff(ssd_chunked(x, raw, A, B, C, CHUNK, state, dt_bias=bias)[0], y) > 1e-2
    unbiased = torch.nn.functional.softplus(raw)
    assert max_diff(ssd_chunked(x, unbiased, A, B, C, CHUNK, state, D=D)[0], y) > 1e-2


def test_zero_dt_leaves_state_unchanged():
    """dt = 0 (a masked pad) neither decays nor feeds the state."""
    x, dt, A, B, C, state = random_inputs(10)
    _, s = ssd_chunked(x, torch.zeros_like(dt), A, B, C, CHUNK, state)
    assert max_diff(s, state) == 0.0


def test_inputs_not_modified_and_fp32_out():
    x, dt, A, B, C, state = random_inputs(9)
    before = state.clone()
    y, s = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), CHUNK, state)
    assert torch.equal(state, before)
    assert y.dtype == s.dtype == torch.float32


@pytest.fixture
def one_chunk_groups(monkeypatch):
    """Make `ssd_chunked` take its chunks one group at a time (normally a group is several MB of work)."""
    from twotower_cli.ops import ssd

    monkeypatch.setattr(ssd, "_GROUP_ELEMENTS", 1)


@pytest.mark.parametrize("grouped", [False, True])
def test_gradients_equal_sequential(grouped, request):
    """Denoiser training backpropagates through the chunked scan: its gradients must be the recurrence's,
    also when the scan goes a group of chunks at a time."""
    if grouped:
        request.getfixturevalue("one_chunk_groups")
    inputs = random_inputs(3 * CHUNK + 2, p=8, n=4, seed=3) if grouped else random_inputs(21, p=8, n=4, seed=1)
    grads = []
    for scan in (ssd_chunked, ssd_sequential):
        leaves = [t.clone().requires_grad_() for t in inputs]
        x, dt, A, B, C, state = leaves
        y, s = scan(x, dt, A, B, C, CHUNK, state)
        (y.sin().sum() + s.cos().sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, g_chunk, g_seq in zip("x dt A B C state".split(), *grads, strict=True):
        d = max_diff(g_chunk, g_seq) / max(1.0, g_seq.abs().max().item())
        assert d <= 1e-5, f"d/d{name} differs by {d:.3g} (relative to its largest entry)"


@pytest.mark.parametrize("every", [4, 6, 24])
def test_state_every_returns_block_boundary_states(every):
    """`state_every=e` also returns the states entering positions 0, e, 2e, … (training reads them)."""
    x, dt, A, B, C, state = random_inputs(24)
    y, final, starts = ssd_chunked(x, dt, A, B, C, CHUNK, state, state_every=every)
    y_ref, final_ref = ssd_sequential(x, dt, A, B, C, CHUNK, state)
    assert starts.shape == (2, 24 // every, 4, 16, 8)
    assert max_diff(y, y_ref) <= 1e-5 and max_diff(final, final_ref) <= 1e-5
    for j in range(24 // every):
        _, ref = ssd_sequential(x[:, :j * every], dt[:, :j * every], A, B[:, :j * every], C[:, :j * every], CHUNK, state)
        d = max_diff(starts[:, j], ref)
        assert d <= 1e-5, f"state entering position {j * every} differs by {d:.3g}"


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
@pytest.mark.parametrize("grouped", [False, True])
def test_every_execution_path_equals_sequential(mode, grouped, request):
    """Without autograd the scan writes into preallocated buffers, and long inputs go a group of chunks at a
    time: outputs, final state and block-boundary states must not depend on either."""
    if grouped:
        request.getfixturevalue("one_chunk_groups")
    x, dt, A, B, C, state = random_inputs(6 * CHUNK + 3)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with context():
        y, final = ssd_chunked(x, dt, A, B, C, CHUNK, state)
        y_ref, final_ref = ssd_sequential(x, dt, A, B, C, CHUNK, state)
        L = 6 * CHUNK
        _, _, starts = ssd_chunked(x[:, :L], dt[:, :L], A, B[:, :L], C[:, :L], CHUNK, state, state_every=CHUNK)
    assert max_diff(y, y_ref) <= 1e-5 and max_diff(final, final_ref) <= 1e-5
    for j in range(6):
        _, ref = ssd_sequential(x[:, :j * CHUNK], dt[:, :j * CHUNK], A, B[:, :j * CHUNK], C[:, :j * CHUNK], CHUNK, state)
        assert max_diff(starts[:, j], ref) <= 1e-5, f"state entering chunk {j}"


@pytest.mark.parametrize("cpu_chunk", [16, 64, 128])
def test_cpu_chunk_cap_does_not_change_the_result(cpu_chunk, monkeypatch):
    """On CPU the scan caps its chunks at CPU_CHUNK steps whatever chunk_size says: any chunking is the
    same function."""
    from twotower_cli.ops import ssd

    monkeypatch.setattr(ssd, "CPU_CHUNK", cpu_chunk)
    x, dt, A, B, C, state = random_inputs(300, b=1, seed=4)
    with torch.no_grad():
        y, final = ssd_chunked(x, dt, A, B, C, 128, state)
        y_ref, final_ref = ssd_sequential(x, dt, A, B, C, 128, state)
    # (relative to the largest entry: a 128-step chunk sums more terms than the others at this length)
    assert max_diff(y, y_ref) / y_ref.abs().max() <= 5e-6, f"{max_diff(y, y_ref):.3g} vs {y_ref.abs().max():.3g}"
    assert max_diff(final, final_ref) / final_ref.abs().max() <= 5e-6


def test_strong_decay_is_exact_and_causal():
    """Log-decays far below fp32's exp range (dt·A down to -80 a step) take the clamped exp path: results
    still match the recurrence, and the future has exactly no influence on the past."""
    x, dt, A, B, C, state = random_inputs(3 * CHUNK + 1, seed=5)
    dt = dt * 15  # up to ~4.5, with A down to -8.5: a single step can decay by e^-38, a chunk by far more
    y, final = ssd_chunked(x, dt, A, B, C, CHUNK, state)
    y_ref, final_ref = ssd_sequential(x, dt, A, B, C, CHUNK, state)
    assert torch.isfinite(y).all()
    assert max_diff(y, y_ref) <= 1e-5 and max_diff(final, final_ref) <= 1e-5
    t = CHUNK + 3  # change everything from position t on: outputs before t must not move at all
    x2, B2 = x.clone(), B.clone()
    x2[:, t:] += 100.0
    B2[:, t:] *= -3.0
    y2, _ = ssd_chunked(x2, dt, A, B2, C, CHUNK, state)
    assert torch.equal(y2[:, :t], y[:, :t])


@pytest.mark.parametrize("L", [1, 5, 3 * CHUNK + 5])
def test_seeded_scan_of_bf16_inputs_runs_in_fp32(L):
    """Spec §5/§9: a denoiser block is scanned in fp32 from the context's fp32 state, whatever the model
    dtype. The state here is large with a fractional part that bf16 (8 bits of mantissa) would round away,
    so a scan that cast it, or ran the recurrence, in bf16 would be off by far more than the tolerance."""
    x, dt, A, B, C, _ = random_inputs(L, seed=4)
    x, B, C = x.bfloat16(), B.bfloat16(), C.bfloat16()
    state = 300.0 + torch.rand(x.shape[0], x.shape[2], x.shape[3], B.shape[-1],
                               generator=torch.Generator().manual_seed(5))
    y_ref, s_ref = ssd_sequential(x.float(), dt, A, B.float(), C.float(), CHUNK, state.double().float())
    y, s = ssd_chunked(x, dt, A, B, C, CHUNK, state)
    assert y.dtype == s.dtype == torch.float32
    tol = 1e-6 * (1 + y_ref.abs().max().item())
    assert max_diff(y, y_ref) <= tol and max_diff(s, s_ref) <= 1e-6 * 400, f"{max_diff(y, y_ref):.3g}"
    y_step, s_step = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    assert max_diff(y_step, y_ref[:, 0]) <= tol and s_step.dtype == torch.float32
