"""The training loss (spec §8) against a per-block reference written from the spec.

Per sequence the target is cut into blocks of S; block b is denoised from its noisy tokens with the context
tower's state after the clean positions before it (nothing for block 0), conditioned on its masked fraction;
the loss is the mean cross-entropy over the masked positions of the whole batch, with no 1/t weight, and
unmasked positions count for nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.twotower_helpers import write_random_twotower

from twotower_cli import train as T
from twotower_cli.towers import load_model

MASK = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_random_twotower(tmp_path_factory.mktemp("loss") / "tt"), need_denoiser=True).twotower


def reference_terms(model, ids: torch.Tensor, noisy: torch.Tensor, mask: torch.Tensor,
                    S: int) -> list[tuple[torch.Tensor, float]]:
    """(cross-entropy, its block's t) of every masked token: block by block, sequence by sequence, each with a
    context tower run from scratch."""
    terms = []
    for i in range(ids.shape[0]):
        for b in range(ids.shape[1] // S):
            cols = slice(b * S, (b + 1) * S)
            cache = model.context_tower.make_cache(1)
            if b:
                model.context_tower(ids[i:i + 1, :b * S], cache=cache)
            t = mask[i, cols].float().mean()[None]  # the block's masked fraction, as the sampler gives it
            logits = model.denoise(noisy[i:i + 1, cols], cache, t)[0]
            for j in mask[i, cols].nonzero()[:, 0].tolist():
                terms.append((F.cross_entropy(logits[j].double(), ids[i, b * S + j]), float(t)))
    return terms


def reference_loss(model, ids: torch.Tensor, noisy: torch.Tensor, mask: torch.Tensor, S: int) -> torch.Tensor:
    return torch.stack([ce for ce, _ in reference_terms(model, ids, noisy, mask, S)]).mean()


@pytest.mark.parametrize("S", [3, 4, 16])
def test_loss_is_the_mean_masked_cross_entropy_of_the_per_block_denoiser(model, S):
    gen = torch.Generator().manual_seed(S)
    ids = torch.randint(4, model.cfg.vocab_size, (2, 48 // S * S), generator=gen)
    noisy, mask, t = T.add_noise(ids, S, MASK, gen)
    assert not mask.all()  # some positions are not targets
    with torch.no_grad():
        got = T.BlockDenoiser(model)(noisy, t, T.context_pass(model.context_tower, ids, S), ids, mask)
        want = reference_loss(model, ids, noisy, mask, S)
    assert abs(got.item() - want.item()) <= 1e-5, f"loss {got.item():.6f} vs reference {want.item():.6f}"


@pytest.mark.parametrize("per", ["sequence", "block"])
def test_the_noise_level_is_drawn_once_per_sequence_or_once_per_block(per):
    """Spec §8: t ~ U[1e-3, 1] "for each example" (a sequence); --noise-per block draws one for every block.
    Read off the masks alone: the blocks of a sequence share one masking rate (their masked fractions spread
    only by the binomial noise around it, E[t(1-t)]/32 = 1/192 ≈ 0.005) or each has its own (the spread of
    t itself, Var U[0, 1] = 1/12 ≈ 0.083, plus that noise); over all blocks half the tokens are masked."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((2048, 8 * 32), 7)
    noisy, mask, t = T.add_noise(ids, 32, MASK, gen, per)
    frac = mask.view(2048, 8, 32).float().mean(-1)
    assert torch.equal(t, frac) and torch.equal(noisy == MASK, mask)
    within = frac.var(dim=1).mean().item()
    if per == "sequence":
        assert within < 0.008, within
    else:
        assert 0.075 < within < 0.1, within
    assert abs(frac.mean().item() - 0.5) < 0.02


def test_noise_follows_spec_8():
    """t ~ U[1e-3, 1], each token masked independently with probability t (at least one a block): over many
    one-block sequences the masked fraction of blocks drawn with t is t, and blocks are not masked alike."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((4096, 8), 7)
    noisy, mask, t = T.add_noise(ids, 8, MASK, gen)
    assert torch.equal(noisy == MASK, mask) and mask.any(-1).all()
    frac = mask.float().mean(-1)
    assert torch.equal(t[:, 0], frac)
    # the fraction is uniform on [1e-3, 1] up to the ≥1 guard and binomial noise: mean ½, every eighth seen
    assert abs(frac.mean().item() - 0.5) < 0.02
    counts = torch.bincount(mask.sum(-1), minlength=9)[1:]
    assert (counts > 4096 / 8 / 3).all(), counts.tolist()
