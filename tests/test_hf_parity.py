"""Parity with transformers' NemotronHForCausalLM (the dev extra is the oracle; marked `hf`).

Random tiny models covering M, *, E and - are written by transformers' `save_pretrained` (single file and
sharded) and read by our loader; fp32 logits must agree to 1e-4 and greedy 32-token continuations exactly.

Honest comparison: transformers clamps dt at `time_step_min` (1e-3) inside its Mamba mixer
(`self.time_step_limit = (config.time_step_min, inf)`), where NVIDIA's release clamps only at
`time_step_limit` = (0, inf) (spec §9). We set the HF mixers' `time_step_limit` to (0, inf) after loading,
so both sides compute NVIDIA's math; `test_default_hf_clamp_differs` shows the clamp does change logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import GROUPED_ROUTER, build_tiny_config, max_diff, write_hf_checkpoint
from twotower_cli.checkpoint import open_checkpoint
from twotower_cli.model.loading import load_nemotron_h

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

CASES = [("M*EM-E", {}, False), ("-M*E*M", GROUPED_ROUTER, True)]


def load_hf(path, unclamp=True):
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    hf = transformers.NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    if unclamp:
        for m in hf.modules():
            if isinstance(m, NemotronHMamba2Mixer):
                m.time_step_limit = (0.0, math.inf)
    return hf.eval()


def hf_greedy(hf, ids, n):
    """Greedy decoding through transformers' own cache path (generate), no EOS stop."""
    hf.generation_config.eos_token_id = None
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def our_greedy(model, ids, n):
    cache = model.make_cache(ids.shape[0])
    logits = model(ids, cache)
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache)
    return torch.cat(out, 1)


@pytest.mark.parametrize("pattern,overrides,sharded", CASES)
@torch.no_grad()
def test_logits_and_greedy_match_transformers(tmp_path, pattern, overrides, sharded):
    cfg = build_tiny_config(pattern, **overrides)
    path = write_hf_checkpoint(tmp_path, cfg, sharded=sharded)
    assert (len(open_checkpoint(path).files) > 1) == sharded
    ours, hf = load_nemotron_h(path), load_hf(path)
    ids = torch.randint(3, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    d = max_diff(ours(ids), hf(ids).logits)
    assert d <= 1e-4, f"fp32 logits differ from transformers by {d:.3g}"
    a, b = our_greedy(ours, ids[:1, :9], 32), hf_greedy(hf, ids[:1, :9], 32)
    assert torch.equal(a, b), f"greedy continuations differ:\nours {a.tolist()}\nhf   {b.tolist()}"


@torch.no_grad()
def test_default_hf_clamp_differs(tmp_path):
    """With transformers' default dt clamp at time_step_min, logits move: the unclamping above is needed."""
    cfg = build_tiny_config("M*EM-E")
    path = write_hf_checkpoint(tmp_path, cfg)
    ours, hf = load_nemotron_h(path), load_hf(path, unclamp=False)
    for model in (ours.backbone, hf.model):  # heads whose dt sits below 1e-3, as in trained checkpoints
        for i in (0, 3):
            model.layers[i].mixer.dt_bias.fill_(math.log(math.expm1(1e-4)))
    ids = torch.randint(3, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    d = max_diff(ours(ids), hf(ids).logits)
    assert d > 1e-3, f"expected the time_step_min clamp to change logits, max diff only {d:.3g}"


@torch.no_grad()
def test_reads_transformers_in_memory_layout(tmp_path):
    """save_pretrained(save_original_format=False) writes `model.` keys and fused experts [E, out, in]."""
    cfg = build_tiny_config("M*EM-E")
    orig = write_hf_checkpoint(tmp_path, cfg, original_format=True)
    fused = write_hf_checkpoint(tmp_path, cfg, original_format=False)
    names = set(open_checkpoint(fused).tensors)
    assert "model.layers.2.mixer.experts.up_proj" in names and "model.embeddings.weight" in names
    a, b = load_nemotron_h(orig).state_dict(), load_nemotron_h(fused).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def test_shared_expert_width_is_not_multiplied_by_n_shared_experts(tmp_path):
    """transformers and NVIDIA's remote code build the shared expert with `moe_shared_expert_intermediate_size`
    rows whatever `n_shared_experts` says (Nano: 1 shared expert of 3712): a checkpoint transformers writes with
    n_shared_experts=2 must load and give its logits."""
    cfg = build_tiny_config("M*EM-E", n_shared_experts=2)
    torch.manual_seed(0)
    hf_cfg = transformers.NemotronHConfig(**cfg.to_dict())
    hf = transformers.NemotronHForCausalLM(hf_cfg).float().eval()
    for p in hf.parameters():
        p.normal_(0.0, 0.1) if p.dim() > 1 else None
    hf.save_pretrained(tmp_path / "hf")
    ours, hf = load_nemotron_h(tmp_path / "hf"), load_hf(tmp_path / "hf")
    up = ours.backbone.layers[2].mixer.shared_experts.up_proj.weight
    assert up.shape == (cfg.moe_shared_expert_intermediate_size, cfg.hidden_size)
    ids = torch.randint(3, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    d = max_diff(ours(ids), hf(ids).logits)
    assert d <= 1e-4, f"fp32 logits differ from transformers by {d:.3g}"


@torch.no_grad()
def test_a_finite_time_step_limit_clamps_as_transformers_does(tmp_path):
    """A config with a finite `time_step_limit` (the only dt clamp, spec §1/§4): softplus(dt + dt_bias) is
    clamped into it, as transformers' chunked scan does with `dt_limit` (its one-token step passes no limit,
    so only the full forward is compared). Both bounds bite: dt_bias spreads the heads' dt across them."""
    cfg = build_tiny_config("M*EM-E", time_step_limit=[0.05, 0.2])
    path = write_hf_checkpoint(tmp_path, cfg)
    ours, hf, free = load_nemotron_h(path), load_hf(path, unclamp=False), load_nemotron_h(path)
    assert ours.cfg.time_step_limit == (0.05, 0.2)
    free.backbone.layers[0].mixer.time_step_limit = free.backbone.layers[3].mixer.time_step_limit = (0.0, math.inf)
    for model in (ours.backbone, hf.model, free.backbone):
        for i in (0, 3):
            model.layers[i].mixer.dt_bias.copy_(torch.linspace(-6.0, 2.0, cfg.mamba_num_heads))
    for m in hf.modules():
        if hasattr(m, "time_step_limit"):
            m.time_step_limit = (0.05, 0.2)
    ids = torch.randint(3, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2))
    d = max_diff(ours(ids), hf(ids).logits)
    assert d <= 1e-4, f"clamped fp32 logits differ from transformers by {d:.3g}"
    assert max_diff(ours(ids), free(ids)) > 1e-3  # the clamp does change the logits


@torch.no_grad()
def test_left_padded_batch_matches_transformers(tmp_path):
    """Prompts of different lengths, left-padded with an attention mask (spec §9): at the real positions our
    logits equal transformers' (which zeroes pad states before the projection and after the conv; pads then
    come before any state, so neither feeds nor decays it), and each row equals the prompt run alone."""
    cfg = build_tiny_config("M*EM-E")
    path = write_hf_checkpoint(tmp_path, cfg)
    ours, hf = load_nemotron_h(path), load_hf(path)
    gen = torch.Generator().manual_seed(3)
    lengths = [13, 1, 6]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, cfg.vocab_size, (n,), generator=gen)
        mask[i, T - n:] = 1
    got, want = ours(ids, attention_mask=mask.bool()), hf(ids, attention_mask=mask).logits
    for i, n in enumerate(lengths):
        d = max_diff(got[i, T - n:], want[i, T - n:])
        assert d <= 1e-4, f"row {i} ({n} tokens): fp32 logits differ from transformers by {d:.3g}"
        d = max_diff(got[i, T - n:], hf(ids[i:i + 1, T - n:]).logits[0])
        assert d <= 1e-4, f"row {i} ({n} tokens) differs from the prompt alone by {d:.3g}"
