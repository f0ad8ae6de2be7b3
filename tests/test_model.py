"""The NemotronH tower: names equal the checkpoint layout, caches equal full forwards, MoE equals a naive
reference, left padding equals one sequence at a time, the Mamba mixer never writes back its input state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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


# -------------------------------------------------------------------------------------------------- MoE

def naive_moe(moe: MoE, x: torch.Tensor, cfg, dtype=torch.float32) -> torch.Tensor:
    """One token and one expert at a time, straight from spec §2."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
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
        y = sum(w[i] * moe.experts[e](x[t]).to(dtype) for i, e in enumerate(chosen))
        out[t] = y.to(x.dtype) + moe.shared_experts(x[t])
    return out


@pytest.mark.parametrize("overrides", [{}, GROUPED_ROUTER, {"norm_topk_prob": False}])
@pytest.mark.parametrize("router_dtype", [torch.float32, torch.float64])
def test_moe_equals_naive_reference(overrides, router_dtype):
    cfg = build_tiny_config(**overrides)
    moe = MoE(cfg, router_dtype)
    init_nemotron_h(moe, torch.Generator().manual_seed(0), std=0.1)
    with torch.no_grad():  # a bias large enough to change choices
        moe.gate.e_score_correction_bias.copy_(randn(cfg.n_routed_experts, seed=5) * 0.1)
    x = randn(3, 5, cfg.hidden_size, seed=1)
    got = moe(x)
    ref = naive_moe(moe, x.reshape(-1, cfg.hidden_size), cfg, router_dtype).reshape(x.shape)
    d = max_diff(got, ref)
    assert d <= 1e-5, f"MoE vs naive: max diff {d:.3g}"
    # The bias matters for selection (so the test would see it ignored) but never for the weights.
    _, with_bias = moe.gate(x.reshape(-1, cfg.hidden_size), router_dtype)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
    _, without = moe.gate(x.reshape(-1, cfg.hidden_size), router_dtype)
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values)
    if cfg.n_group > 1:  # topk_group = 1: each token's experts lie in one group
        assert torch.all(with_bias.min(-1).values // 4 == with_bias.max(-1).values // 4)


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
