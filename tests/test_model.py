"""The NemotronH tower: names equal the checkpoint layout, caches equal full forwards, MoE equals a naive
reference, left padding equals one sequence at a time, the Mamba mixer never writes back its input state."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import GROUPED_ROUTER, build_tiny_config, build_tiny_model, max_diff
from twotower_cli import layout
from twotower_cli.model import (
    Attention,
    GatedGroupRMSNorm,
    KVCache,
    Mamba2Mixer,
    MambaState,
    MoE,
    NemotronHModel,
    init_nemotron_h,
)
from twotower_cli.model.mlp import MLP
from twotower_cli.model.moe import _GROUPED_MM as GROUPED_MM
from twotower_cli.model.moe import Experts, Router
from twotower_cli.model.norm import RMSNorm

PATTERNS = ["M*EM-E", "*M-E*M"]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- names and init

@pytest.mark.parametrize("overrides", [{}, GROUPED_ROUTER, {"mamba_proj_bias": True, "use_conv_bias": False}])
def test_state_dict_equals_layout(overrides):
    cfg = build_tiny_config("M*EM-E", **overrides)
    model = build_tiny_model(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == layout.nemotron_h_shapes(cfg)
    tower = NemotronHModel(cfg)
    got = {f"context_tower.{k}": tuple(v.shape) for k, v in tower.state_dict().items()}
    assert got == layout.tower_shapes(cfg, "context_tower.")


def test_init_is_seeded_and_follows_the_recipe():
    cfg = build_tiny_config()
    a, b, c = build_tiny_model(cfg, 0), build_tiny_model(cfg, 0), build_tiny_model(cfg, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    m = a.backbone.layers[0].mixer
    assert torch.all((m.A_log.exp() >= 1) & (m.A_log.exp() <= 16))
    dt = F.softplus(m.dt_bias)
    assert torch.all((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)), dt
    assert torch.all(m.D == 1) and torch.all(m.norm.weight == 1)
    assert a.backbone.layers[2].mixer.gate.e_score_correction_bias.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ Mamba-2

def make_mixer(seed=0):
    cfg = build_tiny_config()
    mixer = Mamba2Mixer(cfg)
    init_nemotron_h(mixer, torch.Generator().manual_seed(seed), std=0.1)
    return cfg, mixer


@pytest.mark.parametrize("split", [1, 2, 5])
def test_conv_from_state_equals_conv_over_concatenation(split):
    cfg, mixer = make_mixer()
    xBC = randn(2, 11, cfg.conv_dim)
    full, _ = mixer.conv(xBC, None)
    first, state = mixer.conv(xBC[:, :split], None)
    second, _ = mixer.conv(xBC[:, split:], state)
    assert state.shape == (2, cfg.conv_dim, cfg.conv_kernel)
    d = max_diff(torch.cat([first, second], 1), full)
    assert d <= 1e-6, f"max diff {d:.3g}"


def test_mixer_from_state_equals_full_and_does_not_write_back():
    cfg, mixer = make_mixer()
    x = randn(2, 21, cfg.hidden_size)
    full, final = mixer(x)
    out1, s1 = mixer(x[:, :9])
    seed = s1.clone()
    out2, s2 = mixer(x[:, 9:], s1)  # chunked scan from a state
    out3, s3 = mixer(x[:, 9:10], s1)  # one-step update from the same state
    assert torch.equal(s1.conv, seed.conv) and torch.equal(s1.ssm, seed.ssm), "mixer wrote into its input state"
    d = max_diff(torch.cat([out1, out2], 1), full)
    assert d <= 1e-5, f"split vs full: {d:.3g}"
    assert max_diff(s2.ssm, final.ssm) <= 1e-5 and max_diff(s2.conv, final.conv) == 0
    assert max_diff(out3, out2[:, :1]) <= 1e-5, f"step vs chunk: {max_diff(out3, out2[:, :1]):.3g}"


def test_pads_feed_and_decay_nothing():
    """pad_mask False zeroes x, B, C and dt: from a non-zero state, pads leave the SSM state as it was."""
    cfg, mixer = make_mixer()
    _, state = mixer(randn(2, 6, cfg.hidden_size))
    _, after = mixer(randn(2, 5, cfg.hidden_size, seed=1), state, pad_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert max_diff(after.ssm, state.ssm) == 0.0
    assert torch.all(after.conv == 0)  # raw xBC columns of pads are zeros, as for a fresh sequence


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_rms_norm_is_the_fp32_formula(dtype, weight_dtype):
    """x·rsqrt(mean(x²) + eps)·weight over the last dim, in fp32, cast back once (NVIDIA's reference), whether
    the weight has the activations' dtype (a bf16 model: F.rms_norm takes both as they are) or not."""
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn(64, seed=3))
    norm.to(weight_dtype)
    x = (randn(3, 5, 64, seed=1) * 4).to(dtype)
    xf = x.double()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()).to(dtype)
    got = norm(x)
    assert got.dtype == dtype
    ulp = 1e-6 if dtype == torch.float32 else 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10  # one rounding
    assert max_diff(got, ref) <= ulp * ref.abs().max().item()
    if dtype != torch.float32:
        # the weight multiply happens before the rounding: the fp32 formula's result rounded once (rounding the
        # normalised x first, then the product, differs in about a quarter of these elements)
        once = (norm.weight.float() * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)))
        assert (got != once.to(dtype)).float().mean().item() <= 0.01


def test_gated_norm_is_grouped_and_gate_first():
    y, z = randn(3, 64, seed=1), randn(3, 64, seed=2)
    norm = GatedGroupRMSNorm(64, 4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn(64, seed=3))
    u = (y * F.silu(z)).view(3, 4, 16)
    ref = (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 64) * norm.weight
    assert max_diff(norm(y, z), ref) <= 1e-6
    ungrouped = GatedGroupRMSNorm(64, 1)
    ungrouped.load_state_dict(norm.state_dict())
    assert max_diff(ungrouped(y, z), ref) > 1e-3  # the grouping matters, so the check above can fail


# -------------------------------------------------------------------------------------------- attention

def test_attention_mask_and_past():
    cfg = build_tiny_config()
    attn = Attention(cfg)
    init_nemotron_h(attn, torch.Generator().manual_seed(0), std=0.2)
    x = randn(2, 7, cfg.hidden_size)
    out_full, k, v = attn(x)
    past = KVCache(k[:, :, :4].clone(), v[:, :, :4].clone())
    before = past.clone()
    out_tail, _, _ = attn(x[:, 4:], past)  # causal over [past ‖ new]
    assert torch.equal(past.k, before.k) and past.length == 4, "attention modified the past"
    assert max_diff(out_tail, out_full[:, 4:]) <= 1e-5
    # Non-causal over past: the explicit all-True mask and causal=False agree, and differ from causal.
    bi, _, _ = attn(x[:, 4:], past, causal=False)
    bi_mask, _, _ = attn(x[:, 4:], past, mask=torch.ones(1, 1, 3, 7, dtype=torch.bool))
    assert max_diff(bi, bi_mask) == 0 and max_diff(bi, out_tail) > 1e-4
    # Reference math with GQA (query head j reads kv head j // 2).
    q = attn.q_proj(x[:, 4:]).view(2, 3, 4, 16).transpose(1, 2)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(16), -1) @ vv
    ref = attn.o_proj(ref.transpose(1, 2).reshape(2, 3, 64))
    assert max_diff(bi, ref) <= 1e-5


def long_query_case(case: str, causal_mask: bool = False):
    """(cfg, attention, x [2, 11, H], t_past, past, mask) for the row-chunk tests: "causal" (a fresh prefill),
    "past" (4 tokens cached first) or "mask" (row 0 left-padded by 3; bidirectional unless `causal_mask`)."""
    cfg = build_tiny_config()
    attn = Attention(cfg)
    init_nemotron_h(attn, torch.Generator().manual_seed(0), std=0.2)
    x = randn(2, 11, cfg.hidden_size, seed=3)
    t_past = 4 if case == "past" else 0
    past = None
    if case == "past":
        _, k, v = attn(randn(2, t_past, cfg.hidden_size, seed=4))
        past = KVCache(k, v)
    mask = None
    if case == "mask":
        mask = torch.ones(2, 1, 11, 11, dtype=torch.bool)
        mask = mask.tril() if causal_mask else mask
        mask[0, :, :, :3] = False
    return cfg, attn, x, t_past, past, mask


@pytest.mark.parametrize("case", ["causal", "past", "mask"])
def test_long_queries_attend_in_row_chunks_with_the_same_numbers(case, monkeypatch):
    """The explicit path splits the queries so that a chunk's scores stay under SCORE_ELEMENTS (a long prefill
    held [h, L, L] fp32 three times); forced down to 2-3 rows a chunk, it gives the unsplit numbers and never
    builds scores for more rows than that."""
    from twotower_cli.model import attention as attention_mod

    cfg, attn, x, t_past, past, mask = long_query_case(case)
    whole, _, _ = attn(x, past, mask=mask)
    rows_seen = []
    explicit = attention_mod.Attention._explicit

    def spy(self, q, *args):
        rows_seen.append(q.shape[2])
        return explicit(self, q, *args)

    monkeypatch.setattr(attention_mod.Attention, "_explicit", spy)
    monkeypatch.setattr(attention_mod, "SCORE_ELEMENTS", 2 * cfg.num_attention_heads * (t_past + 11) * 2 + 7)
    chunked, _, _ = attn(x, past, mask=mask)
    assert rows_seen == [2, 2, 2, 2, 2, 1], rows_seen
    assert max_diff(chunked, whole) <= 1e-5


@pytest.mark.parametrize("case", ["past", "mask"])
def test_sdpa_calls_that_build_a_mask_go_in_row_chunks_with_the_same_numbers(case, monkeypatch):
    """On the SDPA path (CUDA's; forced here on CPU) a call that builds an additive mask goes in query chunks
    of at most MASK_ELEMENTS mask entries: the unsplit numbers, a causal chunk after a past reading the keys
    up to its own last query only; a call without a mask (a fresh causal prefill) is not split."""
    from twotower_cli.model import attention as attention_mod
    from twotower_cli.ops import kernels

    cfg, attn, x, t_past, past, mask = long_query_case(case, causal_mask=True)
    with torch.no_grad(), kernels.force(sdpa=True):
        whole, _, _ = attn(x, past, mask=mask)
        calls = []
        sdpa = attention_mod.Attention._sdpa

        def spy(self, q, k, *args):
            calls.append((q.shape[2], k.shape[2]))
            return sdpa(self, q, k, *args)

        monkeypatch.setattr(attention_mod.Attention, "_sdpa", spy)
        mask_batch = 1 if mask is None else 2  # the causal mask after a past is one for the batch
        monkeypatch.setattr(attention_mod, "MASK_ELEMENTS", mask_batch * (t_past + 11) * 3 + 5)  # 3 rows of it
        chunked, _, _ = attn(x, past, mask=mask)
        assert max_diff(chunked, whole) <= 1e-5
        if case == "past":
            assert calls == [(3, 7), (3, 10), (3, 13), (2, 15)], calls
        else:
            assert calls == [(3, 11), (3, 11), (3, 11), (2, 11)], calls
        calls.clear()
        attn(x)  # a fresh causal prefill: flash attention, no mask built, one call
        assert calls == [(11, 11)]


# -------------------------------------------------------------------------------------------------- MoE

def naive_moe(moe: MoE, x: torch.Tensor, cfg, dtype=torch.float32) -> torch.Tensor:
    """One token and one expert at a time, straight from spec §2, with the per-expert tensors of the state
    dict (the checkpoint's layout), not the stacks the module computes with."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    weights = moe.experts.state_dict()

    def expert(e, v):
        return F.relu(v @ weights[f"{e}.up_proj.weight"].T).square() @ weights[f"{e}.down_proj.weight"].T

    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        s = torch.sigmoid(x[t].to(dtype) @ moe.gate.weight.to(dtype).T)
        biased = (s + moe.gate.e_score_correction_bias.to(dtype)).tolist()
        allowed = list(range(E))
        if cfg.n_group > 1:
            size = E // cfg.n_group
            group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(cfg.n_group)]
            groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
            allowed = [e for e in allowed if e // size in groups]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:k]
        w = s[chosen]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        w = w * cfg.routed_scaling_factor
        y = sum(w[i] * expert(e, x[t]).to(dtype) for i, e in enumerate(chosen))
        out[t] = y.to(x.dtype) + moe.shared_experts(x[t])
    return out


def expert_paths(monkeypatch) -> list[str]:
    """Records which way each `Experts` call ran: "grouped" (one grouped GEMM pair) or "loop"."""
    ran: list[str] = []
    for path in ("grouped", "loop"):
        real = getattr(Experts, f"_{path}")
        monkeypatch.setattr(Experts, f"_{path}", lambda self, *a, _real=real, _p=path: ran.append(_p) or _real(self, *a))
    return ran


@pytest.mark.parametrize("path", ["grouped", "loop"])
@pytest.mark.parametrize("overrides", [{}, GROUPED_ROUTER, {"norm_topk_prob": False}])
@pytest.mark.parametrize("router_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("one_at_a_time", [False, True])  # True: each token alone, a batch-1 decode step's route
def test_moe_equals_naive_reference(overrides, router_dtype, path, one_at_a_time, monkeypatch):
    cfg = build_tiny_config(**overrides)
    moe = MoE(cfg, router_dtype)
    init_nemotron_h(moe, torch.Generator().manual_seed(0), std=0.1)
    with torch.no_grad():  # a bias large enough to change choices
        moe.gate.e_score_correction_bias.copy_(randn(cfg.n_routed_experts, seed=5) * 0.1)
    x = randn(3, 5, cfg.hidden_size, seed=1)
    ran = expert_paths(monkeypatch)
    if path == "grouped" and GROUPED_MM is None:
        pytest.skip("this torch has no grouped GEMM")
    with torch.no_grad() if path == "grouped" else contextlib.nullcontext():  # grouped: inference only
        if one_at_a_time:
            got = torch.stack([moe(x[b, i:i + 1]) for b in range(3) for i in range(5)]).reshape(x.shape)
        else:
            got = moe(x)  # (the loop: parameters requiring grad)
    assert set(ran) == {path}
    ref = naive_moe(moe, x.reshape(-1, cfg.hidden_size), cfg, router_dtype).reshape(x.shape)
    d = max_diff(got, ref)
    assert d <= 1e-5, f"MoE vs naive: max diff {d:.3g}"
    if one_at_a_time:  # some token's experts come out of top-k in descending id order (its weights get sorted)
        _, chosen = moe.gate(x.reshape(-1, cfg.hidden_size), router_dtype)
        assert (chosen[:, 0] > chosen[:, 1]).any()
        return
    # The bias matters for selection (so the test would see it ignored) but never for the weights.
    _, with_bias = moe.gate(x.reshape(-1, cfg.hidden_size), router_dtype)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
    _, without = moe.gate(x.reshape(-1, cfg.hidden_size), router_dtype)
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values)
    if cfg.n_group > 1:  # topk_group = 1: each token's experts lie in one group
        assert torch.all(with_bias.min(-1).values // 4 == with_bias.max(-1).values // 4)


def test_router_reuses_its_fp64_casts_only_while_they_are_current():
    """For inference the fp64 router keeps its cast weight and bias; every change to them (an in-place
    update, a `.data` swap, a state-dict load) is seen at the next call, and with autograd nothing is kept."""
    cfg = build_tiny_config()
    moe = MoE(cfg, torch.float64)
    init_nemotron_h(moe, torch.Generator().manual_seed(0), std=0.1)
    gate = moe.gate
    x = randn(7, cfg.hidden_size, seed=1)

    def check():  # against a router that has never cast anything
        fresh = Router(cfg)
        fresh.load_state_dict(gate.state_dict())
        with torch.no_grad():
            got, want = gate(x, torch.float64), fresh(x, torch.float64)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        return got

    first = check()
    cast = gate._derived["weight:torch.float64"][2]
    check()
    assert gate._derived["weight:torch.float64"][2] is cast  # reused, not cast again
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(randn(cfg.n_routed_experts, seed=5) * 0.3)  # in place
    assert not torch.equal(check()[1], first[1])  # the new bias changes the choices, and is seen
    with torch.no_grad():
        gate.weight.mul_(-1)
    check()
    gate.weight.data = randn(*gate.weight.shape, seed=7) * 0.1
    check()
    state = {k: v.clone() * 2 for k, v in gate.state_dict().items()}
    gate.load_state_dict(state, assign=True)
    check()
    assert gate._derived["weight:torch.float64"][2] is not cast
    # with autograd the weight gets its gradient through the cast, which is not kept
    gate._derived.clear()
    weights, _ = gate(x, torch.float64)
    weights.sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0 and not gate._derived



def test_router_under_no_reuse_sees_a_write_that_keeps_the_version():
    """FSDP gathers a parameter into the same storage without advancing its version counter (writes through
    `.data` do the same): the kept cast is then stale, and `no_reuse` (what `train --fsdp` runs in) sees the
    new weight."""
    from twotower_cli.model.derived import no_reuse

    cfg = build_tiny_config()
    moe = MoE(cfg, torch.float64)
    init_nemotron_h(moe, torch.Generator().manual_seed(0), std=0.1)
    gate = moe.gate
    x = randn(7, cfg.hidden_size, seed=1)
    with torch.no_grad():
        before = gate(x, torch.float64)[0]
        gate.weight.data.copy_(randn(*gate.weight.shape, seed=9) * 0.3)  # same storage, same version
        stale = gate(x, torch.float64)[0]
        with no_reuse():
            fresh = gate(x, torch.float64)[0]
        want = Router(cfg)
        want.load_state_dict(gate.state_dict())
        want = want(x, torch.float64)[0]
    assert torch.equal(stale, before) and torch.equal(fresh, want) and not torch.equal(fresh, before)

def random_experts(n=5, hidden=16, intermediate=24, bias=False, dtype=torch.float32, seed=0) -> Experts:
    experts = Experts(n, hidden, intermediate, bias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return experts.to(dtype)


def per_row_experts(experts: Experts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Row by row from the per-expert tensors of the state dict: down @ relu(up @ x + b)² + b."""
    w = experts.state_dict()
    ids = [e for e, n in enumerate(counts) for _ in range(n)]
    out = []
    for r, e in enumerate(ids):
        h = x[r].float() @ w[f"{e}.up_proj.weight"].float().T + w.get(f"{e}.up_proj.bias", torch.zeros(1)).float()
        y = F.relu(h).square() @ w[f"{e}.down_proj.weight"].float().T + w.get(f"{e}.down_proj.bias", torch.zeros(1)).float()
        out.append(y)
    return torch.stack(out) if out else x.new_zeros(x.shape).float()


def magnitude(t: torch.Tensor) -> float:
    return max(t.abs().max().item(), 1.0) if t.numel() else 1.0


@pytest.mark.parametrize("counts", [[3, 0, 2, 4, 1], [0, 0, 1, 0, 0], [16, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_loop(dtype, bias, counts, monkeypatch):
    """The grouped GEMM pair and the per-expert loop give the same numbers (bit for bit on the CPU without
    biases), empty experts and a decode's single row included, and both equal the per-row formula."""
    if GROUPED_MM is None:
        pytest.skip("this torch has no grouped GEMM")
    experts = random_experts(bias=bias, dtype=dtype)
    x = randn(sum(counts), 16, seed=3).to(dtype)
    ends = torch.tensor(counts).cumsum(0).int()
    ran = expert_paths(monkeypatch)
    with torch.no_grad():
        grouped = experts(x, ends)
        monkeypatch.setattr(experts, "grouped", False)
        loop = experts(x, ends)
    assert ran == (["grouped", "loop"] if sum(counts) else ["loop", "loop"])  # no rows: nothing to group
    assert grouped.shape == loop.shape == x.shape and grouped.dtype == dtype
    if bias and dtype == torch.bfloat16:  # F.linear adds the bias before rounding, the grouped path after
        assert max_diff(grouped, loop) <= 0.02 * magnitude(loop)
    else:
        assert torch.equal(grouped, loop)
    ref = per_row_experts(experts, x, counts)
    tol = 1e-5 if dtype == torch.float32 else 0.03 * magnitude(ref)
    assert max_diff(loop.float(), ref) <= tol


def test_a_grouped_gemm_that_raises_falls_back_to_the_loop_once_with_a_warning(monkeypatch):
    from twotower_cli.model import moe as moe_module

    calls = []

    def refuses(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no grouped GEMM for this case")

    monkeypatch.setattr(moe_module, "_GROUPED_MM", refuses)
    monkeypatch.setattr(moe_module, "_GROUPED_FAILED", {})
    experts = random_experts()
    x, ends = randn(10, 16, seed=3), torch.tensor([3, 0, 2, 4, 1]).cumsum(0).int()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="grouped GEMM failed on cpu .*per-expert loop"):
            first = experts(x, ends)
        second = experts(x, ends)
        monkeypatch.setattr(experts, "grouped", False)
        loop = experts(x, ends)
    assert calls == [1] and list(moe_module._GROUPED_FAILED) == [("cpu", torch.float32)]
    assert torch.equal(first, loop) and torch.equal(second, loop)


@pytest.mark.parametrize("path", ["grouped", "loop"])
def test_long_inputs_are_routed_in_slices_with_the_same_numbers(monkeypatch, path):
    """A prompt longer than MOE_SLICE_TOKENS goes through in slices (bounded buffers), with the
    numbers of one pass (up to the rounding of matmuls over fewer rows)."""
    from twotower_cli.model import moe as moe_module

    cfg = build_tiny_config()
    moe = MoE(cfg, torch.float64)
    init_nemotron_h(moe, torch.Generator().manual_seed(0), std=0.1)
    x = randn(2, 13, cfg.hidden_size, seed=1)
    monkeypatch.setattr(moe.experts, "grouped", path == "grouped")
    with torch.no_grad():
        whole = moe(x)
        monkeypatch.setattr(moe_module, "MOE_SLICE_TOKENS", 4)
        calls = []
        real = MoE._routed
        monkeypatch.setattr(MoE, "_routed", lambda self, f: calls.append(f.shape[0]) or real(self, f))
        sliced = moe(x)
    assert calls == [4] * 6 + [2]
    assert max_diff(sliced, whole) <= 1e-6 * magnitude(whole), max_diff(sliced, whole)


def test_describe_says_how_the_experts_run(monkeypatch):
    from twotower_cli.model import moe as moe_module

    if GROUPED_MM is None:
        pytest.skip("this torch has no grouped GEMM")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert moe_module.describe(cpu, torch.float32) == "grouped GEMM"
    assert moe_module.describe(cpu, torch.float64) == "per-expert loop (no grouped GEMM for torch.float64)"
    assert moe_module.describe(torch.device("mps"), torch.float16) == "per-expert loop (no grouped GEMM on mps)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert moe_module.describe(cuda, torch.bfloat16) == "grouped GEMM"
    assert "takes bf16 on CUDA, not float32" in moe_module.describe(cuda, torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 8.0" in moe_module.describe(cuda, torch.bfloat16)
    monkeypatch.setattr(moe_module, "_GROUPED_FAILED", {("cpu", torch.float32): "RuntimeError: no"})
    assert moe_module.describe(cpu, torch.float32) == "per-expert loop (the grouped GEMM failed: RuntimeError: no)"
    monkeypatch.setattr(moe_module, "_GROUPED_MM", None)
    assert moe_module.describe(cpu, torch.bfloat16) == "per-expert loop (this torch has no grouped GEMM)"


def test_cpu_groups_only_when_rows_cover_the_experts(monkeypatch):
    """On the CPU the grouped GEMM walks empty groups too, so a decode step (6 rows over 128 experts) loops."""
    if GROUPED_MM is None:
        pytest.skip("this torch has no grouped GEMM")
    experts = random_experts(n=128)
    ran = expert_paths(monkeypatch)
    with torch.no_grad():
        for rows in (6, 15, 16, 96):
            counts = torch.zeros(128, dtype=torch.long)
            counts[torch.arange(rows) * 7 % 128] = 1
            experts(randn(rows, 16, seed=rows), counts.cumsum(0).int())
    assert ran == ["loop", "loop", "grouped", "grouped"]


def test_experts_train_through_the_loop_with_per_expert_gradients():
    """With autograd recording, the loop runs; the stacked gradient's row e is expert e's gradient."""
    experts = random_experts()
    counts = [3, 0, 2, 4, 1]
    x = randn(10, 16, seed=4)
    w = randn(10, 16, seed=5)
    (experts(x, torch.tensor(counts).cumsum(0).int()) * w).sum().backward()
    ref = random_experts()
    state = {k: v.clone().requires_grad_() for k, v in ref.state_dict().items()}
    per_row = []
    for r, e in enumerate(e for e, n in enumerate(counts) for _ in range(n)):
        h = F.relu(x[r] @ state[f"{e}.up_proj.weight"].T).square()
        per_row.append(h @ state[f"{e}.down_proj.weight"].T)
    (torch.stack(per_row) * w).sum().backward()
    for e in range(5):
        for proj in ("up_proj", "down_proj"):
            want = state[f"{e}.{proj}.weight"].grad
            want = torch.zeros_like(state[f"{e}.{proj}.weight"]) if want is None else want
            assert max_diff(getattr(experts, proj).grad[e], want) <= 1e-5, (e, proj)
    assert torch.count_nonzero(experts.up_proj.grad[1]) == 0  # expert 1 got no rows


@pytest.mark.parametrize("bias", [False, True])
def test_each_expert_stack_gets_its_gradient_from_one_node(bias):
    """The loop's backward builds each stack's gradient once: the stack's AccumulateGrad has one producer
    (an unbind), not one per expert (indexing the stack per expert would zero-fill a whole-stack gradient
    for every expert that got rows: E times the memory traffic)."""
    experts = random_experts(bias=bias)
    y = experts(randn(10, 16, seed=4), torch.tensor([3, 0, 2, 4, 1]).cumsum(0).int())
    producers: dict[int, list[str]] = {id(p): [] for p in experts.parameters()}
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and hasattr(nxt, "variable") and id(nxt.variable) in producers:
                producers[id(nxt.variable)].append(node.name())
            todo.append(nxt)
    for name, p in experts.named_parameters():
        assert len(producers[id(p)]) == 1, (name, producers[id(p)])


@pytest.mark.parametrize("bias", [False, True])
def test_experts_state_dict_is_a_list_of_mlps(bias):
    """Keys, order and values of a ModuleList of per-expert MLPs (NVIDIA's layout), as views of the stacks;
    either loads into the other."""
    experts = random_experts(bias=bias)
    mlps = nn.ModuleList(MLP(16, 24, bias) for _ in range(5))
    assert list(experts.state_dict()) == list(mlps.state_dict())
    row = experts.state_dict()["3.down_proj.weight"]
    assert row.data_ptr() == experts.down_proj[3].data_ptr() and torch.equal(row, experts.down_proj[3])
    mlps.load_state_dict(experts.state_dict())
    x = randn(2, 16, seed=6)
    with torch.no_grad():
        for e in range(5):
            ends = torch.tensor([0] * e + [2] * (5 - e)).int()  # both rows to expert e
            assert max_diff(experts(x, ends), mlps[e](x)) <= 1e-6
        for p in mlps.parameters():
            p.mul_(2)
    fresh = random_experts(bias=bias, seed=9)
    fresh.load_state_dict(mlps.state_dict())
    assert torch.equal(fresh.up_proj, 2 * experts.up_proj)


def test_experts_load_assigns_rows_of_one_tensor_without_a_copy():
    with torch.device("meta"):
        experts = Experts(5, 16, 24)
    up, down = randn(5, 24, 16, seed=1), randn(5, 16, 24, seed=2)
    state = {f"{j}.{p}.weight": t[j] for j in range(5) for p, t in (("up_proj", up), ("down_proj", down))}
    experts.load_state_dict(state, assign=True)
    assert experts.up_proj.data_ptr() == up.data_ptr() and experts.down_proj.data_ptr() == down.data_ptr()
    assert isinstance(experts.up_proj, nn.Parameter)
    # Rows out of order, or separate tensors: copied into a new stack, in the keys' order.
    state = {f"{j}.{p}.weight": t[4 - j] for j in range(5) for p, t in (("up_proj", up), ("down_proj", down))}
    experts.load_state_dict(state, assign=True)
    assert experts.up_proj.data_ptr() != up.data_ptr() and torch.equal(experts.up_proj, up.flip(0))


def test_experts_load_names_what_is_wrong():
    experts = random_experts()
    good = experts.state_dict()
    bad = {k: v for k, v in good.items() if k != "2.up_proj.weight"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*2\.up_proj\.weight"):
        experts.load_state_dict(bad)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*5\.up_proj\.weight"):
        experts.load_state_dict({**good, "5.up_proj.weight": good["0.up_proj.weight"]})
    with pytest.raises(RuntimeError, match=r"size mismatch for 1\.down_proj\.weight"):
        experts.load_state_dict({**good, "1.down_proj.weight": torch.zeros(16, 23)})
    experts.load_state_dict({**good, "5.up_proj.weight": good["0.up_proj.weight"]}, strict=False)


# ---------------------------------------------------------------------------------------- tower caching

@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_then_decode_equals_full(pattern):
    cfg = build_tiny_config(pattern)
    model = build_tiny_model(cfg, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    cache = model.make_cache(2)
    steps = [model(ids[:, :11], cache)] + [model(ids[:, t:t + 1], cache) for t in range(11, 19)]
    d = max_diff(torch.cat(steps, 1), full)
    assert d <= 1e-5, f"prefill + decode vs full: max diff {d:.3g}"
    assert cache.length == 19 and cache.layers[pattern.index("*")].length == 19


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_then_blocks_of_5_equals_full(pattern):
    cfg = build_tiny_config(pattern)
    model = build_tiny_model(cfg, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 27), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.make_cache(2)
    outs = [model(ids[:, :7], cache)] + [model(ids[:, t:t + 5], cache) for t in range(7, 27, 5)]
    d = max_diff(torch.cat(outs, 1), full)
    assert d <= 1e-5, f"prefill + blocks of 5 vs full: max diff {d:.3g}"


def test_cache_clone_is_independent():
    cfg = build_tiny_config()
    model = build_tiny_model(cfg, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    cache = model.make_cache(1)
    model(ids[:, :8], cache)
    snap = cache.clone()
    a = model(ids[:, 8:], cache)
    b = model(ids[:, 8:], snap)  # the snapshot still holds the state after 8 tokens
    assert max_diff(a, b) == 0 and snap.length == cache.length == 9
    assert isinstance(snap.layers[0], MambaState) and snap.layers[2] is None


@pytest.mark.parametrize("pattern", PATTERNS)
def test_left_padded_batch_equals_one_at_a_time(pattern):
    cfg = build_tiny_config(pattern)
    model = build_tiny_model(cfg, std=0.1)
    gen = torch.Generator().manual_seed(3)
    lengths, decode = [12, 5, 9], 4
    seqs = [torch.randint(3, cfg.vocab_size, (n + decode,), generator=gen) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        ids[i, T - n:], mask[i, T - n:] = s[:n], True

    no_cache = model(ids, attention_mask=mask)
    cache = model.make_cache(len(seqs))
    batched = [model(ids, cache, attention_mask=mask)]
    for t in range(decode):
        batched.append(model(torch.stack([s[n + t] for s, n in zip(seqs, lengths, strict=True)])[:, None], cache))
    batched = torch.cat(batched, 1)
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        alone = model(s[None])
        d_prefill = max_diff(no_cache[i, T - n:], alone[0, :n])
        d_cached = max_diff(batched[i, T - n:], alone[0])
        assert d_prefill <= 1e-5 and d_cached <= 1e-5, f"seq {i}: {d_prefill:.3g}, {d_cached:.3g}"


def test_bf16_forward_keeps_scan_in_fp32():
    cfg = build_tiny_config()
    model = build_tiny_model(cfg, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    ref = model(ids)
    from twotower_cli.model.loading import cast_

    cast_(model, torch.bfloat16)
    assert model.backbone.layers[0].mixer.A_log.dtype == torch.float32
    assert model.backbone.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    cache = model.make_cache(1)
    assert cache.layers[0].ssm.dtype == torch.float32 and cache.layers[0].conv.dtype == torch.bfloat16
    out = model(ids, cache)
    assert out.dtype == torch.float32 and max_diff(out, ref) < 0.1
