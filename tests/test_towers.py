"""The two-tower model (spec §4–§6) against independent references.

- a fresh split (identity time conditioning, denoiser = context tower): mock-AR == AR token for token,
  and the denoiser's logits for a one-token block equal the base model's next-position logits;
- with random, non-identity time conditioning and a denoiser different from the context tower, the block
  forward equals a slow per-token re-implementation written here from the spec (loops over time steps and
  heads, explicit conv windows, explicit softmax over [context K/V ‖ block K/V]).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.twotower_helpers import random_base, tiny_cfg, write_base, write_twotower

from twotower_cli import sampler as S
from twotower_cli.errors import TwoTowerError
from twotower_cli.towers import TowerBackend, TwoTower, load_model, timestep_embedding


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    cfg = tiny_cfg()
    base = random_base(cfg, seed=3)
    folder = write_twotower(tmp_path_factory.mktemp("fresh") / "tt", base)
    return cfg, base, folder


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 0.25, 1.0])
    e = timestep_embedding(t)
    k = 5
    f = math.exp(-math.log(10000) * k / 128)
    assert e.shape == (3, 256)
    assert abs(e[1, k].item() - math.cos(250 * f)) < 1e-5
    assert abs(e[1, 128 + k].item() - math.sin(250 * f)) < 1e-5


def test_time_embedding_of_a_bf16_model_scales_t_in_bf16_as_nvidia_does(tmp_path):
    """NVIDIA's TimestepEmbedder computes t * 1000 in the model dtype (its sampler casts t to the model dtype
    first; its Megatron trainer casts the drawn t to the embeddings' dtype), and only then the fp32 sinusoid:
    a bf16 denoiser was trained on, and is sampled by NVIDIA with, bf16(bf16(t) * 1000). For t = 3/16 that
    is 188, not 187.5: half a radian apart in the fastest frequency. fp32 models: exactly t * 1000."""
    folder = write_twotower(tmp_path / "tt", random_base(tiny_cfg(), seed=2), time_conditioning="random")
    t = torch.arange(1, 17) / 16  # every masked fraction of a 16-token block
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    for dtype in (torch.bfloat16, torch.float32):
        emb = load_model(folder, need_denoiser=True, dtype=dtype).twotower.t_embedder
        scaled = (t.to(dtype) * 1000).float()
        args = scaled[:, None] * freqs[None]
        want = emb.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))
        with torch.no_grad():
            assert torch.equal(emb(t), want), dtype
    assert scaled.tolist() == (t * 1000).tolist()  # fp32: nothing rounded
    assert (t.bfloat16() * 1000).float()[2].item() == 188.0


def test_mock_ar_equals_ar_on_fresh_split(fresh):
    _, _, folder = fresh
    lm = load_model(folder, need_denoiser=True)
    be = TowerBackend(lm.twotower)
    prompt = [[5, 9, 11, 7, 20, 6]]
    cfg_ar = S.SamplingConfig(mode="ar", max_new_tokens=64)
    cfg_mock = S.SamplingConfig(mode="mock_ar", max_new_tokens=64)
    ar = S.run(be, prompt, cfg_ar).generations[0].token_ids
    mock = S.run(be, prompt, cfg_mock).generations[0].token_ids
    assert len(ar) == 64
    assert mock == ar


def test_one_token_block_equals_base_next_position_logits(fresh):
    _, base, folder = fresh
    lm = load_model(folder, need_denoiser=True)
    ids = torch.tensor([[5, 9, 11, 7, 20, 6, 13, 8]])
    with torch.no_grad():
        ref = base(ids)  # [1, L, V]
        for n in range(1, ids.shape[1]):
            cache = lm.twotower.context_tower.make_cache(1)
            lm.twotower.context_tower(ids[:, :n], cache=cache)
            out = lm.twotower.denoise(ids[:, n:n + 1], cache, torch.tensor([0.37]))
            diff = (out[0, 0] - ref[0, n]).abs().max().item()
            assert diff <= 1e-5, f"position {n}: max diff {diff}"


def test_ar_mode_loads_context_tower_only_and_matches_base(fresh, tmp_path):
    _, base, folder = fresh
    lm = load_model(folder, need_denoiser=False)
    assert lm.twotower is None
    plain = load_model(write_base(tmp_path / "base", base), need_denoiser=False)
    prompt = [[5, 9, 11, 7]]
    c = S.SamplingConfig(mode="ar", max_new_tokens=24)
    a = S.run(TowerBackend(ar=lm.ar), prompt, c).generations[0].token_ids
    b = S.run(TowerBackend(ar=plain.ar), prompt, c).generations[0].token_ids
    assert a == b


# ---------------------------------------------------------------------------------------------- slow reference

def ref_rmsnorm(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)) * w.float()


def ref_mamba(mixer, cfg, h, conv_hist, ssm):
    """Per-token Mamba-2 over h [L, H] from conv_hist [conv_dim, K-1] raw columns and ssm [heads, p, n]."""
    nh, p, n, G, _K = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups, cfg.conv_kernel
    di = cfg.d_inner
    A = -torch.exp(mixer.A_log.float())
    outs = []
    hist = conv_hist.clone()
    state = ssm.clone()
    for t in range(h.shape[0]):
        proj = mixer.in_proj(h[t])
        z, xBC, dt = proj[:di], proj[di:di + cfg.conv_dim], proj[di + cfg.conv_dim:]
        window = torch.cat([hist, xBC[:, None]], dim=1)  # [conv_dim, K]
        hist = window[:, 1:]
        conv = (window * mixer.conv1d.weight[:, 0, :]).sum(-1) + mixer.conv1d.bias
        conv = F.silu(conv)
        x, B, C = conv[:di].view(nh, p), conv[di:di + G * n].view(G, n), conv[di + G * n:].view(G, n)
        dt = F.softplus(dt + mixer.dt_bias)
        y = torch.empty(nh, p)
        for hh in range(nh):
            g = hh // (nh // G)
            state[hh] = torch.exp(dt[hh] * A[hh]) * state[hh] + dt[hh] * torch.outer(x[hh], B[g])
            y[hh] = state[hh] @ C[g] + mixer.D[hh] * x[hh]
        u = (y.reshape(di) * F.silu(z)).view(G, di // G)
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon)
        outs.append(mixer.out_proj(u.reshape(di) * mixer.norm.weight))
    return (torch.stack(outs) if outs else h.new_zeros(0, h.shape[-1])), hist, state


def ref_moe(mixer, cfg, h):
    experts = mixer.experts.state_dict()  # per-expert tensors, as the checkpoint holds them
    outs = [h.new_zeros(0, h.shape[-1])]
    for t in range(h.shape[0]):
        s = torch.sigmoid(h[t].double() @ mixer.gate.weight.double().T)
        chosen = torch.topk(s + mixer.gate.e_score_correction_bias.double(), cfg.num_experts_per_tok).indices
        w = s[chosen] / (s[chosen].sum() + 1e-20) * cfg.routed_scaling_factor
        o = sum(w[j].float() * (F.relu(h[t] @ experts[f"{e}.up_proj.weight"].T) ** 2) @ experts[f"{e}.down_proj.weight"].T
                for j, e in enumerate(chosen.tolist()))
        sh = mixer.shared_experts
        outs.append((o + sh.down_proj(F.relu(sh.up_proj(h[t])) ** 2))[None])
    return torch.cat(outs)


def ref_denoise(model: TwoTower, ctx_ids: torch.Tensor, block: torch.Tensor, t: float) -> torch.Tensor:
    """Spec §4–§5 written out per token: context tower run without caches, then the block."""
    cfg = model.cfg
    ctxT, den = model.context_tower, model.denoiser_tower
    eps = cfg.layer_norm_epsilon
    K = cfg.conv_kernel
    # the context tower over the whole context, remembering each layer's normed input
    x = ctxT.embeddings(ctx_ids)
    normed = []
    for layer in ctxT.layers:
        h = ref_rmsnorm(x, layer.norm.weight, eps)
        normed.append(h)
        if layer.kind == "M":
            out, _, _ = ref_mamba(layer.mixer, cfg, h, torch.zeros(cfg.conv_dim, K - 1),
                                  torch.zeros(cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size))
        elif layer.kind == "*":
            out = ref_attention(layer.mixer, cfg, h, h, causal=True)
        elif layer.kind == "E":
            out = ref_moe(layer.mixer, cfg, h)
        else:
            out = layer.mixer.down_proj(F.relu(layer.mixer.up_proj(h)) ** 2)
        x = x + out
    # time conditioning (t None: none at all, tables included: shift 0, scale 0, gate 1)
    e = None if t is None else model.t_block(model.t_embedder(torch.tensor([t])))[0].view(3, -1)
    y = den.embeddings(block)
    for i, layer in enumerate(den.layers):
        shift, scale, gate = (torch.tensor([0.0, 0.0, 1.0])[:, None].expand(3, cfg.hidden_size) if e is None
                              else model.scale_shift_tables[i] + e).unbind(0)
        if layer.kind in "M*":
            h = ref_rmsnorm(y * (1 + scale) + shift, layer.norm.weight, eps)
        else:
            h = ref_rmsnorm(y, layer.norm.weight, eps) * (1 + scale) + shift
        if layer.kind == "M":
            cm = ctxT.layers[i].mixer
            _, hist, ssm = ref_mamba(cm, cfg, normed[i], torch.zeros(cfg.conv_dim, K - 1),
                                     torch.zeros(cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size))
            out, _, _ = ref_mamba(layer.mixer, cfg, h, hist, ssm)
        elif layer.kind == "*":
            cm = ctxT.layers[i].mixer
            out = ref_attention(layer.mixer, cfg, h, None, causal=False, ctx_h=normed[i], ctx_mixer=cm)
        elif layer.kind == "E":
            out = ref_moe(layer.mixer, cfg, h)
        else:
            out = layer.mixer.down_proj(F.relu(layer.mixer.up_proj(h)) ** 2)
        y = y + gate * out
    return model.lm_head(ref_rmsnorm(y, den.norm_f.weight, eps))


def ref_attention(mixer, cfg, h, _unused, causal, ctx_h=None, ctx_mixer=None):
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_head_dim
    L = h.shape[0]
    q = mixer.q_proj(h).view(L, nh, d)
    k = mixer.k_proj(h).view(L, nkv, d)
    v = mixer.v_proj(h).view(L, nkv, d)
    if ctx_h is not None:
        n = ctx_h.shape[0]
        k = torch.cat([ctx_mixer.k_proj(ctx_h).view(n, nkv, d), k])
        v = torch.cat([ctx_mixer.v_proj(ctx_h).view(n, nkv, d), v])
    out = torch.empty(L, nh, d)
    for i in range(L):
        for hh in range(nh):
            kv = hh // (nh // nkv)
            visible = k.shape[0] if not causal else i + 1
            s = (k[:visible, kv] @ q[i, hh]) / math.sqrt(d)
            out[i, hh] = torch.softmax(s, 0) @ v[:visible, kv]
    return mixer.o_proj(out.reshape(L, nh * d))


def test_denoiser_block_matches_slow_reference_with_time_conditioning(tmp_path):
    cfg = tiny_cfg(pattern="M*EM-E*M")
    base = random_base(cfg, seed=5)
    other = random_base(cfg, seed=6)
    folder = write_twotower(tmp_path / "tt", base, time_conditioning="random", denoiser=other)
    model = load_model(folder, need_denoiser=True).twotower
    ctx = torch.tensor([[5, 9, 11, 7, 20, 6, 13, 8, 30, 31, 4]])  # longer than chunk_size (8)
    block = torch.tensor([[3, 12, 3, 3, 17, 3]])
    t = 4 / 6
    with torch.no_grad():
        cache = model.context_tower.make_cache(1)
        model.context_tower(ctx, cache=cache)
        before = [None if c is None else c.clone() for c in cache.layers]
        got = model.denoise(block, cache, torch.tensor([t]))[0]
        want = ref_denoise(model, ctx[0], block[0], t)
        # the context state is only read
        for a, b in zip(before, cache.layers, strict=True):
            if a is not None and hasattr(a, "ssm"):
                assert torch.equal(a.ssm, b.ssm) and torch.equal(a.conv, b.conv)
            elif a is not None:
                assert torch.equal(a.k, b.k) and a.k.shape == b.k.shape
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"denoiser vs slow reference: max diff {diff}"
    # and time conditioning matters: a different t changes the logits
    with torch.no_grad():
        other_t = model.denoise(block, cache, torch.tensor([0.1]))[0]
    assert (other_t - got).abs().max().item() > 1e-3


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    cfg = tiny_cfg(pattern="M*EM-E*M")
    folder = write_twotower(tmp_path_factory.mktemp("trained") / "tt", random_base(cfg, seed=5), "random",
                            denoiser=random_base(cfg, seed=6))
    return load_model(folder, need_denoiser=True).twotower


# context lengths around chunk_size (8): none (mock_ar after a one-token prompt), one token, one chunk less
# one, several chunks; blocks: one token, shorter than a chunk, longer than a chunk and not a multiple of it
@pytest.mark.parametrize("ctx_lengths,size", [((0,), 4), ((1,), 6), ((1, 11, 20), 13), ((7, 2), 1), ((20, 0, 9), 5)])
def test_left_padded_batch_of_blocks_equals_the_slow_reference_row_by_row(trained_like, ctx_lengths, size):
    """Spec §5 for a batch: contexts of different lengths, left-padded (spec §9) and read in one prefill, each
    row with its own t. Every row's block logits equal the slow reference run on that row alone, so padding
    leaks neither into the Mamba states the denoiser starts from nor into its attention."""
    model = trained_like
    gen = torch.Generator().manual_seed(sum(ctx_lengths) + size)
    ctxs = [torch.randint(4, model.cfg.vocab_size, (n,), generator=gen) for n in ctx_lengths]
    blocks = torch.randint(4, model.cfg.vocab_size, (len(ctxs), size), generator=gen)
    blocks[torch.rand(blocks.shape, generator=gen) < 0.5] = 3
    t = torch.rand(len(ctxs), generator=gen)
    ids, mask = S.left_pad([c.tolist() for c in ctxs], 0) if max(ctx_lengths) else (None, None)
    with torch.no_grad():
        cache = model.context_tower.make_cache(len(ctxs))
        if ids is not None:
            model.context_tower(ids, cache=cache, attention_mask=None if bool(mask.all()) else mask)
        got = model.denoise(blocks, cache, t)
        for b, ctx in enumerate(ctxs):
            want = ref_denoise(model, ctx, blocks[b], float(t[b]))
            diff = (got[b] - want).abs().max().item()
            assert diff <= 1e-4, f"row {b} (context {len(ctx)}, block {size}): max diff {diff:.3g}"


def test_mock_ar_step_has_no_time_conditioning_at_all(trained_like):
    """mock_ar's denoiser step (t=None, spec §7) runs without time conditioning: not even the per-layer
    tables, as NVIDIA's generate_mock_ar runs the denoiser with no modulation. On a model whose tables are not
    the identity that differs from every t."""
    model = trained_like
    ctx, last = torch.tensor([5, 9, 11, 7, 20, 6, 13, 8, 30]), torch.tensor([[17]])
    with torch.no_grad():
        cache = model.context_tower.make_cache(1)
        model.context_tower(ctx[None], cache=cache)
        got = model.denoise(last, cache, None)[0]
        want = ref_denoise(model, ctx, last[0], None)
        assert (got - want).abs().max().item() <= 1e-4
        assert (got - model.denoise(last, cache, torch.zeros(1))[0]).abs().max().item() > 1e-3


def test_head_on_needed_rows_only_equals_full(fresh):
    _, _, folder = fresh
    model = load_model(folder, need_denoiser=True).twotower
    with torch.no_grad():
        cache = model.context_tower.make_cache(2)
        model.context_tower(torch.tensor([[5, 9, 11], [7, 8, 6]]), cache=cache)
        block = torch.tensor([[3, 12, 3, 3], [14, 3, 15, 16]])
        rows = block == 3
        full = model.denoise(block, cache, torch.tensor([0.75, 0.25]))
        part = model.denoise(block, cache, torch.tensor([0.75, 0.25]), rows=rows)
    assert torch.equal(part[rows], full[rows])


@pytest.mark.parametrize(("start", "chunk"), [(1, 256), (1, 3), (4, 5), (9, 2), (12, 4)])
def test_token_log_probs_are_the_log_softmax_of_a_full_forward(fresh, start, chunk):
    """serve's logprobs and bench's likelihoods: per-token and top-k log-probabilities, whatever the chunking
    of the head, equal a full forward's log-softmax; `start` at or past the end gives empty results."""
    from twotower_cli.towers import causal_lm_view, token_log_probs

    _, _, folder = fresh
    ar = causal_lm_view(load_model(folder, need_denoiser=True).twotower)
    ids = [5, 9, 11, 7, 8, 6, 14, 3, 15, 16, 12]
    lps, top_ids, top_lps = token_log_probs(ar, ids, top=3, start=start, chunk=chunk)
    with torch.no_grad():
        want = F.log_softmax(ar(torch.tensor([ids]))[0].float(), dim=-1)[start - 1:-1]  # row j predicts ids[j + 1]
    n = max(len(ids) - start, 0)
    assert lps.shape == (n,) and top_ids.shape == (n, 3) and top_lps.shape == (n, 3)
    if n:
        torch.testing.assert_close(lps, want.gather(-1, torch.tensor(ids[start:])[:, None])[:, 0])
        torch.testing.assert_close(top_lps, want.topk(3, dim=-1).values)
        assert torch.equal(top_ids, want.topk(3, dim=-1).indices)


def test_token_log_probs_of_nan_logits_raise(fresh):
    """NaN logits (a NaN weight) give serve's logprobs and bench's likelihoods an error, not NaN numbers."""
    from twotower_cli.towers import causal_lm_view, token_log_probs

    _, _, folder = fresh
    ar = causal_lm_view(load_model(folder, need_denoiser=True).twotower)
    ids = [5, 9, 11, 7, 8, 6, 14, 3, 15, 16, 12]
    assert bool(token_log_probs(ar, ids, top=2)[0].isfinite().all())
    with torch.no_grad():
        ar.lm_head.weight[7, 0] = float("nan")  # one word's logit: its row's softmax is NaN
    with pytest.raises(TwoTowerError, match="log-probabilities are NaN or infinite"):
        token_log_probs(ar, ids, top=2, chunk=3)


def test_written_checkpoints_are_readable_by_others(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = write_twotower(tmp_path / "tt", random_base(tiny_cfg(), 1), tokenizer=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------- dtype rules

# spec §1: kept in fp32 in memory whatever the load dtype (written out here, not taken from the code)
SPEC_FP32 = ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.gate.weight", "mixer.gate.e_score_correction_bias")


def moe_router_dtypes(tower) -> set:
    return {layer.mixer.router_dtype for layer in tower.layers if layer.kind == "E"}


def test_bf16_load_keeps_the_spec_fp32_tensors_and_fp64_routers(tmp_path):
    """Both towers of a TwoTower loaded in bf16: exactly the spec's fp32 tensors stay fp32, everything else
    is bf16; the routers of both towers (and of `ar` read from a TwoTower checkpoint) run in fp64, a plain
    NemotronH's in fp32 (spec §2 MoE, §9)."""
    cfg = tiny_cfg(pattern="M*EM-E*M")
    base = random_base(cfg, seed=5)
    folder = write_twotower(tmp_path / "tt", base, time_conditioning="random")
    model = load_model(folder, need_denoiser=True, dtype=torch.bfloat16).twotower
    seen = set()
    for name, t in model.state_dict().items():
        fp32 = name.endswith(SPEC_FP32)
        seen.update(s for s in SPEC_FP32 if name.endswith(s))
        assert t.dtype == (torch.float32 if fp32 else torch.bfloat16), f"{name}: {t.dtype}"
    assert seen == set(SPEC_FP32)
    assert moe_router_dtypes(model.context_tower) == moe_router_dtypes(model.denoiser_tower) == {torch.float64}
    ar = load_model(folder, need_denoiser=False, dtype=torch.bfloat16).ar
    assert moe_router_dtypes(ar.backbone) == {torch.float64}
    plain = load_model(write_base(tmp_path / "base", base), need_denoiser=False).ar
    assert moe_router_dtypes(plain.backbone) == {torch.float32}
    # the denoiser of a bf16 TwoTower reads the context's fp32 SSM states as they are
    with torch.no_grad():
        cache = model.context_tower.make_cache(1)
        model.context_tower(torch.tensor([[5, 9, 11, 7, 20]]), cache=cache)
        assert all(c.ssm.dtype == torch.float32 for c in cache.layers if hasattr(c, "ssm"))
        logits = model.denoise(torch.tensor([[3, 3, 12]]), cache, torch.tensor([0.66]))
    assert logits.dtype == torch.float32 and logits.isfinite().all()
