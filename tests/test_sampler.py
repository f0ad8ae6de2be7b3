"""The sampler's commit rule (spec §7) on a scripted fake denoiser: every clause, NFE, early exit, EOS; and
every mode on a real tiny TwoTower against a reference sampler written from spec §7 (no cache reuse)."""

from __future__ import annotations

import math

import pytest
import torch

from twotower_cli import sampler as S
from twotower_cli.errors import TwoTowerError

V, MASK = 32, 3


def logits_with(conf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logits [.., V] whose softmax, with the mask id excluded, puts probability `conf` on `target`."""
    shape = conf.shape
    probs = torch.full((*shape, V), 0.0)
    rest = (1 - conf) / (V - 2)  # spread over every id but the target and the mask id
    probs[:] = rest[..., None]
    probs.scatter_(-1, target[..., None], conf[..., None])
    probs[..., MASK] = 0.5  # any finite mass here: the sampler must ignore the mask id's logit
    return probs.clamp_min(1e-30).log()


class ScriptedBackend:
    """Denoiser whose confidence for position j at its n-th call is `table[n][j]`; it always predicts
    token 10 + j + 5*n at position j, so a revised commit would be visible."""

    vocab_size = V

    def __init__(self, table: list[list[float]]):
        self.table = table
        self.calls = 0
        self.extended: list[torch.Tensor] = []
        self.ts: list[torch.Tensor] = []

    def reset(self, batch: int) -> None:
        self.extended = []

    def extend(self, ids, attention_mask=None):
        self.extended.append(ids)
        return torch.zeros(ids.shape[0], V)

    def denoise(self, block, t, rows=None):
        self.ts.append(t.clone())
        row = self.table[min(self.calls, len(self.table) - 1)]
        B, Sz = block.shape
        conf = torch.tensor(row[:Sz]).expand(B, Sz)
        target = (10 + torch.arange(Sz) + 5 * self.calls).clamp_max(V - 1).expand(B, Sz)
        self.calls += 1
        return logits_with(conf, target)


def cfg(**kw) -> S.SamplingConfig:
    base = dict(mode="mask_diffusion", block_size=4, threshold=0.8, max_new_tokens=4, mask_token_id=MASK)
    base.update(kw)
    return S.SamplingConfig(**base)


def steps_of(events):
    return [e for e in events if isinstance(e, S.Step)]


def test_threshold_commits_every_confident_position_and_strictly_greater():
    # 0.95 and 0.81 exceed 0.8; 0.79 does not
    be = ScriptedBackend([[0.95, 0.79, 0.81, 0.1], [0.5, 0.5, 0.5, 0.5]])
    ev = list(S.generate(be, [[5]], cfg(steps=4)))
    st = steps_of(ev)
    assert st[0].committed == [[0, 2]]
    assert st[0].committed_tokens == [[10, 12]]


def test_at_least_one_commit_per_step():
    be = ScriptedBackend([[0.1, 0.3, 0.2, 0.05]] * 4)
    st = steps_of(list(S.generate(be, [[5]], cfg(steps=4))))
    assert [s.committed[0] for s in st] == [[1], [2], [0], [3]]  # the most confident masked, one a step


def test_at_least_ceil_masked_over_steps_left():
    be = ScriptedBackend([[0.1, 0.4, 0.3, 0.2, 0.6, 0.5, 0.05, 0.7]] * 8)
    st = steps_of(list(S.generate(be, [[5]], cfg(block_size=8, max_new_tokens=8, steps=3))))
    # step 0: ceil(8/3)=3 → the three most confident; step 1: ceil(5/2)=3; step 2 (last): the remaining 2
    assert [len(s.committed[0]) for s in st] == [3, 3, 2]
    assert st[0].committed[0] == [4, 5, 7]


def test_at_most_masked_and_all_on_last_step():
    be = ScriptedBackend([[0.99] * 4])
    st = steps_of(list(S.generate(be, [[5]], cfg(steps=4))))
    assert len(st) == 1 and st[0].committed == [[0, 1, 2, 3]]  # never more than what is masked
    be = ScriptedBackend([[0.1] * 4])
    st = steps_of(list(S.generate(be, [[5]], cfg(steps=2))))
    assert [len(s.committed[0]) for s in st] == [2, 2]  # ceil(4/2) then everything on the last step



def test_a_sequences_nfe_counts_the_forwards_it_needed_not_its_batchs():
    """In a batch, a row whose block is filled sits out the steps the other rows still need: those are not
    its NFE (so tokens/NFE does not depend on the batch)."""
    class PerRow(ScriptedBackend):
        def denoise(self, block, t, rows=None):
            B, Sz = block.shape
            conf = torch.tensor([[0.99] * Sz, [0.1] * Sz])[:B]  # row 0 sure of everything, row 1 of nothing
            self.calls += 1
            return logits_with(conf, (10 + torch.arange(Sz)).expand(B, Sz))

    fin = S.run(PerRow([]), [[5], [6]], cfg(steps=4, max_new_tokens=8))
    assert fin.nfe == 8 and [g.nfe for g in fin.generations] == [2, 8]
    alone = S.run(PerRow([]), [[5]], cfg(steps=4, max_new_tokens=8))
    assert alone.generations[0].nfe == 2

def test_committed_tokens_never_revised_and_t_is_masked_fraction():
    # later calls predict different tokens everywhere; earlier commits must stay
    be = ScriptedBackend([[0.9, 0.1, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1], [0.1, 0.1, 0.9, 0.9]])
    ev = list(S.generate(be, [[5]], cfg(steps=4)))
    final = [e for e in ev if isinstance(e, S.BlockDone)][0].tokens[0].tolist()
    assert final == [10, 16, 22, 23]
    assert [float(t[0]) for t in be.ts] == [1.0, 0.75, 0.5]


def test_nfe_counts_and_early_exit_when_no_masks_remain():
    be = ScriptedBackend([[1.0] * 4])
    fin = [e for e in S.generate(be, [[5]], cfg(steps=4, max_new_tokens=12)) if isinstance(e, S.Finished)][0]
    assert fin.nfe == 3 and be.calls == 3  # one forward per block, not `steps`
    assert len(fin.generations[0].token_ids) == 12
    assert len(be.extended) == 1 + 2  # prompt, then each committed block but the last


def test_short_last_block_any_max_new_tokens():
    be = ScriptedBackend([[0.1] * 16])
    ev = list(S.generate(be, [[5]], cfg(block_size=4, steps=4, max_new_tokens=6)))
    sizes = [e.size for e in ev if isinstance(e, S.BlockStarted)]
    assert sizes == [4, 2]
    assert len(ev[-1].generations[0].token_ids) == 6


def test_eos_cuts_output_and_stops():
    class EosBackend(ScriptedBackend):
        def denoise(self, block, t, rows=None):
            Sz = block.shape[1]
            target = torch.tensor([20, 2, 21, 22][:Sz]).expand(block.shape[0], Sz)
            self.calls += 1
            return logits_with(torch.full(target.shape, 0.99), target)

    be = EosBackend([[0]])
    fin = S.run(be, [[5]], cfg(max_new_tokens=12), eos_ids=[2])
    g = fin.generations[0]
    assert g.token_ids == [20] and g.finish_reason == "eos"
    assert fin.nfe == 1  # stopped after the block holding EOS
    fin = S.run(EosBackend([[0]]), [[5]], cfg(max_new_tokens=12, stop_ids=(21,)))
    assert fin.generations[0].token_ids == [20, 2] and fin.nfe == 1


class StopAtOne(ScriptedBackend):
    """Per row r of the batch: confidences `table[r][n]` at its n-th call, targets [20, 2, 21, 22] (2: EOS)."""

    def denoise(self, block, t, rows=None):
        B, Sz = block.shape
        conf = torch.tensor([self.table[r][min(self.calls, len(self.table[r]) - 1)][:Sz] for r in range(B)])
        self.calls += 1
        self.rows_asked = getattr(self, "rows_asked", []) + [rows.any(dim=-1).tolist()]
        return logits_with(conf, torch.tensor([20, 2, 21, 22][:Sz]).expand(B, Sz))


SURE_OF_THE_HEAD = [[0.99, 0.99, 0.1, 0.1]]  # step 1 commits [20, 2, _, _]: the text ends at the EOS
SURE_OF_THE_EOS = [[0.1, 0.99, 0.1, 0.1], [0.99, 0.1, 0.1, 0.1]]  # step 1 commits [_, 2, _, _], step 2 slot 0


@pytest.mark.parametrize("runner", ["generate", "continuous"])
def test_a_block_ends_when_its_text_is_decided_by_a_stop_id(runner):
    """An EOS committed with every slot before it committed decides the text: the block takes no more
    forwards (the slots after it stay masked), the text is the one a full block gives, cut at the EOS. An EOS
    with a masked slot before it decides nothing yet. In a batch the settled row sits out the other's steps."""
    from twotower_cli.batching import Continuous, run_in_order

    def run(table, prompts):
        be = StopAtOne(table)
        settings = cfg(steps=4, max_new_tokens=12, threshold=0.8)
        if runner == "generate":
            fin = S.run(be, prompts, settings, eos_ids=[2])
            return be, fin.generations, fin.nfe
        batch = Continuous(be, settings, [2])
        gens = [g for _, g, _ in run_in_order(batch, prompts)]
        return be, gens, batch.nfe

    be, (g,), nfe = run([SURE_OF_THE_HEAD], [[5]])
    assert g.token_ids == [20] and g.finish_reason == "eos" and nfe == g.nfe == 1  # was 3: steps after the EOS
    be, (g,), nfe = run([SURE_OF_THE_EOS], [[5]])
    assert g.token_ids == [20] and nfe == g.nfe == 2  # slot 0 was masked after step 1: one more step
    slow = [[0.1, 0.1, 0.1, 0.1]]  # a row sure of nothing: one slot a step, 4 steps a block
    be, (a, b), nfe = run([SURE_OF_THE_HEAD, slow], [[5], [6]])
    assert a.token_ids == [20] and a.nfe == 1 and b.token_ids == [20] and b.nfe == 2
    assert be.rows_asked[:2] == [[True, True], [False, True]]  # the settled row's head rows are not computed


@pytest.mark.parametrize("runner", ["generate", "continuous"])
def test_a_block_ends_when_until_says_its_committed_prefix_ends_the_text(runner):
    """`until` (a stop text) is asked on each step's committed prefix too: once it holds the stop, the block
    takes no more forwards and the slots after the prefix stay masked, so they are not in the ids; the text
    before the stop is what a full block gives. A stop after a masked slot decides nothing yet."""
    from twotower_cli.batching import Continuous, run_in_order

    def run(table, until):
        be = StopAtOne(table)
        settings = cfg(steps=4, max_new_tokens=12, threshold=0.8)
        if runner == "generate":
            fin = S.run(be, [[5]], settings, eos_ids=[], until=until)
            return fin.generations[0], fin.nfe
        batch = Continuous(be, settings, [], until=until)
        return next(g for _, g, _ in run_in_order(batch, [[5]])), batch.nfe

    wrote_20 = lambda _b, ids: 20 in ids  # noqa: E731 — "the text holds a stop string", on ids
    g, nfe = run([SURE_OF_THE_HEAD], wrote_20)  # step 1 commits [20, 2, _, _]: the prefix holds the stop
    assert (g.token_ids, g.finish_reason, g.nfe, nfe) == ([20, 2], "stop", 1, 1)  # was 3 forwards, [20, 2, 21, 22]
    free, _ = run([SURE_OF_THE_HEAD], None)
    assert free.token_ids[:4] == [20, 2, 21, 22] and free.nfe == 9  # without it: three forwards a block
    wrote_2 = lambda _b, ids: 2 in ids  # noqa: E731
    g, nfe = run([SURE_OF_THE_EOS], wrote_2)  # step 1 commits [_, 2, _, _]: slot 0 masked, step 2 fills it
    assert (g.token_ids, nfe) == ([20, 2], 2)


class RowScript(ScriptedBackend):
    """Row r predicts `targets[r][n]` at the n-th call (the last one after), with confidence `table[r][n]` on
    every slot."""

    def __init__(self, table, targets):
        super().__init__([])
        self.rows_table, self.targets = table, targets

    def denoise(self, block, t, rows=None):
        B, Sz = block.shape
        conf = torch.tensor([[self.rows_table[r][min(self.calls, len(self.rows_table[r]) - 1)]] * Sz
                             for r in range(B)])
        target = torch.tensor([self.targets[r][min(self.calls, len(self.targets[r]) - 1)][:Sz] for r in range(B)])
        self.calls += 1
        return logits_with(conf, target)


def test_a_sequence_that_ended_takes_no_steps_in_its_batchs_later_blocks():
    """In a batch, a sequence that ended (EOS) keeps no later block going: before, its blocks after the end
    were filled like any other's, here four unsure steps a block (no EOS in them to settle at) while the
    other row needed one; that row's tokens are its own either way."""
    settings = cfg(steps=4, max_new_tokens=12, threshold=0.8)
    sure_then_unsure, always_sure = [0.99, 0.1], [0.99]
    ends_then_rambles = [[24, 2, 25, 26], [24, 25, 26, 24]]
    fin = S.run(RowScript([sure_then_unsure, always_sure], [ends_then_rambles, [[27, 28, 29, 30]]]), [[5], [6]],
                settings, eos_ids=[2])
    a, b = fin.generations
    assert (a.token_ids, a.finish_reason, a.nfe) == ([24], "eos", 1)
    alone = S.run(RowScript([always_sure], [[[27, 28, 29, 30]]]), [[6]], settings, eos_ids=[2]).generations[0]
    assert b.token_ids == alone.token_ids == [27, 28, 29, 30] * 3 and b.nfe == alone.nfe == 3
    assert fin.nfe == 3  # was 9: 1 + 4 + 4, the ended row's masked blocks taking every step


def test_topk_and_factor_policies():
    row = [0.99, 0.97, 0.6, 0.95, 0.2, 0.1, 0.1, 0.1]
    # topk: only the schedule, ceil(8/4) = 2 per step, however confident
    st = steps_of(list(S.generate(ScriptedBackend([row] * 8), [[5]],
                                  cfg(block_size=8, max_new_tokens=8, steps=4, policy="topk"))))
    assert [len(s.committed[0]) for s in st] == [2, 2, 2, 2]
    # factor f=1: sorted c = .99,.97,.95,.6 ... ; (n+1)(1-c_n): 0.02, 0.09, 0.2, 2.0 → n = 3
    st = steps_of(list(S.generate(ScriptedBackend([row] * 8), [[5]],
                                  cfg(block_size=8, max_new_tokens=8, steps=8, policy="factor", factor=1.0))))
    assert st[0].committed[0] == [0, 1, 3]


def test_threshold_is_strict():
    conf = torch.tensor([[0.8, 0.8000001, 0.1, 0.1]])
    masked = torch.ones(1, 4, dtype=torch.bool)
    assert S.commit_counts(conf, masked, step=0, steps=4, cfg=cfg()).tolist() == [1]


def test_commit_counts_per_row_in_a_batch():
    conf = torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])
    masked = torch.tensor([[True, True, True, True], [True, True, False, False]])
    k = S.commit_counts(conf, masked, step=0, steps=4, cfg=cfg())
    assert k.tolist() == [2, 1]
    sel = S.select_commits(conf, masked, k)
    assert sel.tolist() == [[True, True, False, False], [True, False, False, False]]


def test_batch_rows_have_their_own_t_and_commits():
    class TwoRows(ScriptedBackend):
        def denoise(self, block, t, rows=None):
            self.ts.append(t.clone())
            conf = torch.tensor([[0.99, 0.99, 0.99, 0.1], [0.1, 0.2, 0.3, 0.4]])
            self.calls += 1
            return logits_with(conf, (10 + torch.arange(4)).expand(2, 4))

    be = TwoRows([[0]])
    st = steps_of(list(S.generate(be, [[5], [6, 7]], cfg(steps=4))))
    assert st[0].committed == [[0, 1, 2], [3]]
    assert be.ts[1].tolist() == [0.25, 0.75]


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar", "mock_ar"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_only_predictions_cross_to_the_host_not_logits(monkeypatch, mode, temperature):
    """The softmax and the choice run where the logits are (the model's device); only [B, S] ids and
    confidences are copied to the CPU, never a [.., V] logits tensor (8 MB per 16-token step on Nano)."""
    class LogitsOnDevice(ScriptedBackend):  # `.cpu()` on these is what a GPU backend's copy would be
        def extend(self, ids, attention_mask=None):
            super().extend(ids, attention_mask)
            return torch.randn(ids.shape[0], V, generator=torch.Generator().manual_seed(ids.shape[1]))

        def denoise(self, block, t, rows=None):
            if t is None:  # mock_ar's one-token step
                return torch.randn(*block.shape, V, generator=torch.Generator().manual_seed(self.calls))
            return super().denoise(block, t, rows)

    copied = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copied.append(tuple(self.shape))
                        or real_cpu(self, *a, **k))
    backend = LogitsOnDevice([[0.9, 0.2, 0.95, 0.1]] * 4)
    fin = S.run(backend, [[5, 6], [7]], cfg(mode=mode, temperature=temperature, max_new_tokens=8),
                generator=torch.Generator().manual_seed(0))
    assert all(len(g.token_ids) == 8 for g in fin.generations)
    assert copied, "the predictions come back to the host"
    assert all(shape[-1] != V for shape in copied), copied


class Poisoned(ScriptedBackend):
    """Logits of random finite values, except `bad` (NaN, +Inf, or a finite control) as id 7's logit in the
    last row, from its `at`-th forward on (extend and denoise count alike)."""

    def __init__(self, bad: float, at: int):
        super().__init__([[0.9, 0.2, 0.95, 0.1]])
        self.bad, self.at, self.forwards = bad, at, 0

    def _poison(self, logits: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        if self.forwards >= self.at:
            logits[-1, ..., 7] = self.bad
        return logits

    def extend(self, ids, attention_mask=None):
        super().extend(ids, attention_mask)
        return self._poison(torch.randn(ids.shape[0], V, generator=torch.Generator().manual_seed(self.forwards)))

    def denoise(self, block, t, rows=None):
        if t is None:  # mock_ar's one-token step
            return self._poison(torch.randn(*block.shape, V, generator=torch.Generator().manual_seed(self.forwards)))
        return self._poison(super().denoise(block, t, rows))


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar", "mock_ar"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise_instead_of_becoming_tokens(mode, temperature, bad):
    """A NaN or +Inf logit (broken weights, an fp16 overflow) makes its row's softmax NaN, and argmax of a NaN
    row is an arbitrary id: the sampler stops with an error rather than write noise as text. -Inf is a
    finite-probability-zero logit (the mask id's own) and goes on; so does a large finite one."""
    c = cfg(mode=mode, temperature=temperature, max_new_tokens=8)
    with pytest.raises(TwoTowerError, match="NaN or infinite") as e:
        S.run(Poisoned(bad, at=3), [[5, 6], [7]], c, generator=torch.Generator().manual_seed(0))
    assert "--dtype" in e.value.hint
    for fine in (float("-inf"), 1e30):
        fin = S.run(Poisoned(fine, at=3), [[5, 6], [7]], c, generator=torch.Generator().manual_seed(0))
        assert all(len(g.token_ids) == 8 for g in fin.generations)


def test_gumbel_sampling_is_seeded_and_confidence_untempered():
    logits = torch.randn(2, 5, V)
    c = cfg(temperature=0.7, top_k=5)
    p1, c1 = S.predict(logits, c, torch.Generator().manual_seed(1), exclude=MASK)
    p2, c2 = S.predict(logits, c, torch.Generator().manual_seed(1), exclude=MASK)
    assert torch.equal(p1, p2) and torch.equal(c1, c2)
    ref = logits.clone()
    ref[..., MASK] = -math.inf
    expect = torch.softmax(ref, -1).gather(-1, p1[..., None])[..., 0]
    torch.testing.assert_close(c1, expect)
    top5 = torch.topk(ref, 5, dim=-1).indices
    assert bool((top5 == p1[..., None]).any(-1).all())
    assert not bool((p1 == MASK).any())


def test_noise_is_drawn_where_the_logits_are(monkeypatch):
    """The Gumbel uniforms come from the caller's generator on its own device (CPU logits here: the seeded
    samples of before); `tests/test_kernels.py` checks the GPU side."""
    drawn = []
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: drawn.append((tuple(a[0]), k.get("device"))) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, V)
    pred, _ = S.predict(logits, cfg(temperature=0.7), g, exclude=MASK)
    assert drawn == [((2, 5, V), torch.device("cpu"))]
    u = real((2, 5, V), generator=torch.Generator().manual_seed(1))  # the same draw, by hand
    scores = torch.log_softmax(logits.masked_fill(torch.arange(V) == MASK, -math.inf) / 0.7, dim=-1)
    assert torch.equal(pred, (scores - torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))).argmax(-1))
    assert S._generator_on(g, torch.device("cpu")) is g and S._generator_on(None, torch.device("cpu")) is None


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = S.filter_logits(logits, None, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("kw", [dict(block_size=0), dict(steps=5), dict(steps=0), dict(threshold=0.0),
                                dict(threshold=1.5), dict(max_new_tokens=0), dict(mask_token_id=V),
                                dict(policy="nope")])
def test_bad_settings_raise_twotower_error(kw):
    with pytest.raises(TwoTowerError):
        list(S.generate(ScriptedBackend([[0.5] * 4]), [[5]], cfg(**kw)))


def test_empty_prompt_is_an_error():
    with pytest.raises(TwoTowerError, match="empty prompt"):
        list(S.generate(ScriptedBackend([[0.5] * 4]), [[]], cfg()))


def test_companion_generators_follow_the_generator_and_stay_bounded(monkeypatch):
    """A CPU generator drawing for another device gets one companion there, seeded once from it (so the same
    seed gives the same companion seed); entries follow the generator object, not a weak reference (torch
    2.11's Generator takes none), and the least recently used go beyond _MAX_COMPANIONS."""
    from collections import OrderedDict

    real = torch.Generator

    class Companion:  # stands in for torch.Generator(device="cuda") on this CPU-only machine
        def __init__(self, device):
            self.device = torch.device(device)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    monkeypatch.setattr(S, "_COMPANIONS", OrderedDict())
    monkeypatch.setattr(S, "_MAX_COMPANIONS", 3)
    gens = [real().manual_seed(i) for i in range(5)]
    again = real().manual_seed(0)
    monkeypatch.setattr(torch, "Generator", Companion)
    other = torch.device("cuda")
    first = S._generator_on(gens[0], other)
    assert isinstance(first, Companion) and S._generator_on(gens[0], other) is first
    assert S._generator_on(gens[0], torch.device("cpu")) is gens[0]  # its own device: itself
    twin = S._generator_on(again, other)
    assert twin is not first and twin.seed == first.seed  # same seed, same companion seed
    for g in gens[1:]:
        S._generator_on(g, other)
    assert len(S._COMPANIONS) == 3
    assert [e[0] for e in S._COMPANIONS.values()] == gens[2:]  # the least recently used went first
    assert S._generator_on(gens[0], other) is not first  # evicted: a new companion (seeded afresh)


# ---------------------------------------------------------------------------------------------- reference sampler

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny TwoTower whose denoiser is unlike its context tower, with random time conditioning."""
    from tests.twotower_helpers import write_random_twotower

    from twotower_cli.towers import load_model

    return load_model(write_random_twotower(tmp_path_factory.mktemp("ref") / "tt"), need_denoiser=True).twotower


def reference_mask_diffusion(model, prompt: list[int], n: int, block: int, steps: int, threshold: float,
                             stops: set[int]) -> list[int]:
    """Spec §7 written out for one sequence, greedy, without any cache reuse: for every step the context
    tower reads the prompt and every committed block from scratch. The last block is n mod block long, with
    min(steps, its size) steps; the reference stops after a block that holds a stop id and cuts at the first."""
    out: list[int] = []
    while len(out) < n:
        size = min(block, n - len(out))
        todo = min(steps, size)
        x = [MASK] * size
        cache = model.context_tower.make_cache(1)
        model.context_tower(torch.tensor([prompt + out]), cache=cache)
        for s in range(todo):
            masked = [j for j in range(size) if x[j] == MASK]
            if not masked:
                break
            t = torch.tensor([len(masked) / size])
            logits = model.denoise(torch.tensor([x]), cache, t)[0].double()
            logits[:, MASK] = -math.inf
            p = torch.softmax(logits, -1)
            pred = p.argmax(-1).tolist()
            conf = {j: p[j, pred[j]].item() for j in masked}
            k = max(sum(c > threshold for c in conf.values()), 1, math.ceil(len(masked) / (todo - s)))
            k = len(masked) if s == todo - 1 else min(k, len(masked))
            for j in sorted(masked, key=lambda j: -conf[j])[:k]:
                x[j] = pred[j]
        out += x
        if any(tok in stops for tok in x):
            break
    cut = next((i for i, tok in enumerate(out) if tok in stops), len(out))
    return out[:cut]


PROMPTS = [[5, 9, 11, 7, 20, 6, 13, 8, 30, 31, 4, 17], [8], [12, 14, 16]]


@pytest.mark.parametrize("n,block,steps,threshold", [(10, 4, 4, 0.3), (9, 4, 2, 0.5), (7, 16, 16, 0.05),
                                                     (12, 1, 1, 0.9), (21, 8, 3, 0.99)])
def test_mask_diffusion_equals_the_spec_reference_sampler(real, n, block, steps, threshold):
    """A batch of prompts of different lengths (one of one token, one longer than chunk_size), -n not a
    multiple of the block (a short last block), against the reference run on each prompt alone."""
    from twotower_cli.towers import TowerBackend

    c = S.SamplingConfig(block_size=block, steps=steps, threshold=threshold, max_new_tokens=n, mask_token_id=MASK)
    with torch.no_grad():
        got = S.run(TowerBackend(real), PROMPTS, c).generations
        for p, g in zip(PROMPTS, got, strict=True):
            want = reference_mask_diffusion(real, p, n, block, steps, threshold, set())
            assert g.token_ids == want and g.finish_reason == "length", f"prompt of {len(p)}"


def test_stop_inside_a_block_ends_the_sequence_there_and_the_rest_goes_on(real):
    """A stop id committed inside a block: the text is cut before it, that sequence commits no later block,
    and the other sequences of the batch go on as they would alone."""
    from twotower_cli.towers import TowerBackend

    c = S.SamplingConfig(block_size=4, steps=4, threshold=0.3, max_new_tokens=12, mask_token_id=MASK)
    with torch.no_grad():
        free = reference_mask_diffusion(real, PROMPTS[0], 12, 4, 4, 0.3, set())
        stop = free[5]  # inside the second block
        assert stop not in free[:4]
        got = S.run(TowerBackend(real), PROMPTS, S.SamplingConfig(**{**c.__dict__, "stop_ids": (stop,)})).generations
        for p, g in zip(PROMPTS, got, strict=True):
            want = reference_mask_diffusion(real, p, 12, 4, 4, 0.3, {stop})
            assert g.token_ids == want, f"prompt of {len(p)}"
    assert got[0].token_ids == free[:free.index(stop)] and got[0].finish_reason == "eos" and got[0].stop_id == stop


@pytest.mark.parametrize("mode", ["mock_ar", "ar"])
def test_one_token_modes_equal_the_spec_reference(real, mode):
    """ar: the context tower and its head over the whole text, argmax of the last position. mock_ar: the
    denoiser without time conditioning reads the last token with the context tower's state before it."""
    from twotower_cli.towers import TowerBackend

    n = 9
    with torch.no_grad():
        got = S.run(TowerBackend(real), PROMPTS, S.SamplingConfig(mode=mode, max_new_tokens=n)).generations
        for p, g in zip(PROMPTS, got, strict=True):
            text = list(p)
            for _ in range(n):
                if mode == "ar":
                    logits = real.context_lm_head(real.context_tower(torch.tensor([text])))[0, -1]
                else:
                    cache = real.context_tower.make_cache(1)
                    if len(text) > 1:
                        real.context_tower(torch.tensor([text[:-1]]), cache=cache)
                    logits = real.denoise(torch.tensor([text[-1:]]), cache, None)[0, -1]
                text.append(int(logits.argmax()))
            assert g.token_ids == text[len(p):], f"{mode}, prompt of {len(p)}"


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-300])
def test_a_temperature_below_fp32s_range_samples_greedily_not_id_0(temperature):
    """logits / 1e-39 overflowed fp32 to ±inf, log_softmax made NaN of them, and the argmax of a NaN row is id 0:
    every token <unk>. A temperature that small is greedy."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50) * 8
    cfg = S.SamplingConfig(temperature=temperature, block_size=4, steps=4)
    pred, conf = S.predict(logits, cfg, torch.Generator().manual_seed(1), exclude=3)
    greedy = logits.clone()
    greedy[..., 3] = float("-inf")
    assert torch.equal(pred, greedy.argmax(-1)) and bool(conf.isfinite().all())


@pytest.mark.parametrize("temperature", [1e39, 1e300])
def test_a_temperature_above_fp32s_range_samples_uniformly_never_the_excluded_id(temperature):
    """At 1e39 (inf in fp32) the excluded id's -inf / inf was NaN: id 0 every draw. It is uniform over the rest."""
    logits = torch.zeros(4000, 1, 8)
    logits[..., 5] = 30.0  # near-certain at temperature 1
    cfg = S.SamplingConfig(temperature=temperature, block_size=4, steps=4)
    pred, _ = S.predict(logits, cfg, torch.Generator().manual_seed(2), exclude=3)
    counts = torch.bincount(pred.flatten(), minlength=8)
    assert counts[3] == 0 and bool((counts[[0, 1, 2, 4, 5, 6, 7]] > 400).all()), counts  # ~571 each


def test_a_temperature_within_range_divides_the_logits_as_before():
    """The clamp changes nothing inside fp32's range: a seed samples what it sampled (Gumbel-max on logits / T)."""
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 40) * 4
    for temperature in (0.01, 0.7, 1.0, 3.0, 1e6):
        cfg = S.SamplingConfig(temperature=temperature, block_size=4, steps=4)
        pred, _ = S.predict(logits, cfg, torch.Generator().manual_seed(5), exclude=None)
        g = torch.Generator().manual_seed(5)
        scores = torch.log_softmax(logits / temperature, dim=-1)
        u = torch.rand(scores.shape, generator=g)
        gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
        want = (scores + gumbel).argmax(-1)
        assert torch.equal(pred, want), temperature
