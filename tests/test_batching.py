"""Continuous batching (`batching.Continuous`, `TowerCache.stack` / `select`): sequences that join a running
batch between blocks and leave it when they end get what the sampler gives each of them alone."""

from __future__ import annotations

import math

import pytest
import torch
from tests.twotower_helpers import Widths, write_random_twotower

from twotower_cli import sampler as S
from twotower_cli.batching import Continuous, RowBlock, RowDone
from twotower_cli.chat import PrefixReuse
from twotower_cli.model.cache import KVCache, MambaState, TowerCache
from twotower_cli.towers import TowerBackend, load_model

EOS = [2, 38]
PROMPTS = [[5, 9, 14, 7, 22, 30], [11, 4], [8, 8, 19, 25, 6, 13, 27, 17, 9], [20], [15, 16, 17, 18], [31, 7, 7]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_random_twotower(tmp_path_factory.mktemp("tt") / "tt"), need_denoiser=True).twotower


def alone(model, prompt, cfg, max_new, eos=EOS):
    return S.run(TowerBackend(model), [prompt], S.SamplingConfig(**{**cfg.__dict__, "max_new_tokens": max_new}),
                 eos).generations[0]


def drain(batch: Continuous, arrivals: dict[int, list[tuple[list[int], int]]]):
    """Step `batch` until it is empty, adding arrivals[k] (prompt, max_new) before step k; each row's
    blocks and its `RowDone`, by row id, and the batch size the backend held after every step."""
    blocks: dict[int, list[RowBlock]] = {}
    done: dict[int, RowDone] = {}
    k, rows_of = 0, {}
    while len(batch) or any(j >= k for j in arrivals):
        for prompt, n in arrivals.get(k, []):
            (rid,) = batch.add([prompt], n)
            rows_of[rid] = (prompt, n)
        for ev in batch.step():
            if isinstance(ev, RowBlock):
                blocks.setdefault(ev.row, []).append(ev)
            else:
                assert ev.row not in done
                done[ev.row] = ev
        k += 1
    return rows_of, blocks, done


# ------------------------------------------------------------------------------------------- the cache

def test_stacked_caches_give_each_row_its_own_logits_and_select_takes_them_apart(model):
    """Prompts read one at a time, stacked into one cache (left-padded to the longest): extending the stack
    gives each row's own next logits; `select` of one row drops the padding no kept row needs."""
    singles = []
    for p in PROMPTS[:3]:
        b = TowerBackend(model)
        b.reset(1)
        b.extend(torch.tensor([p]))
        singles.append(b)
    stacked = TowerBackend(model)
    stacked.cache = TowerCache.stack([b.cache for b in singles])
    assert stacked.cache.length == 9 and stacked.cache.key_mask.sum(dim=1).tolist() == [6, 2, 9]
    nxt = torch.tensor([[12], [13], [14]])
    got = stacked.extend(nxt)
    want = torch.cat([b.extend(nxt[i:i + 1]) for i, b in enumerate(singles)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    block = torch.full((3, 4), 3)
    torch.testing.assert_close(stacked.denoise(block, torch.ones(3)),
                               torch.cat([b.denoise(block[:1], torch.ones(1)) for b in singles]), atol=1e-5, rtol=1e-5)
    one = stacked.cache.select([1])
    assert one.length == 3 and one.key_mask is None  # row 1 read 3 ids: the 7 columns before them are gone
    for mine, theirs in zip(one.layers, singles[1].cache.layers, strict=True):
        if isinstance(mine, KVCache):
            torch.testing.assert_close(mine.k, theirs.k)
        elif isinstance(mine, MambaState):
            torch.testing.assert_close(mine.ssm, theirs.ssm)
            torch.testing.assert_close(mine.conv, theirs.conv)
    two = stacked.cache.select([2, 0])
    assert two.length == 10 and two.key_mask.sum(dim=1).tolist() == [10, 7]


# ------------------------------------------------------------------------------------------- Continuous

@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar", "ar"])
def test_rows_that_join_and_leave_get_what_they_get_alone(model, mode):
    """Six prompts arriving at four different steps, with their own max_new_tokens (some not a multiple of the
    block, so short last blocks of several sizes meet in one step): each row's tokens, finish reason and NFE
    are those of the sampler on its prompt alone, and its blocks add up to its tokens."""
    cfg = S.SamplingConfig(mode=mode, block_size=4, threshold=0.3, max_new_tokens=12)
    arrivals = {0: [(PROMPTS[0], 12), (PROMPTS[1], 10)], 1: [(PROMPTS[2], 7)],
                2: [(PROMPTS[3], 12), (PROMPTS[4], 5)], 4: [(PROMPTS[5], 9)]}
    eos = EOS + [alone(model, PROMPTS[0], cfg, 12, eos=[]).token_ids[5]]  # so that the first row ends early
    rows_of, blocks, done = drain(Continuous(TowerBackend(model), cfg, eos), arrivals)
    assert sorted(done) == list(range(6))
    for rid, (prompt, n) in rows_of.items():
        want = alone(model, prompt, cfg, n, eos)
        got = done[rid].generation
        assert (got.token_ids, got.finish_reason, got.stop_id, got.nfe) == \
               (want.token_ids, want.finish_reason, want.stop_id, want.nfe), (rid, mode)
        ids = [t for b in blocks[rid] for t in b.tokens]
        assert [b.start for b in blocks[rid]] == [sum(len(c.tokens) for c in blocks[rid][:i]) for i in range(len(blocks[rid]))]
        assert ids[:len(got.token_ids)] == got.token_ids
    assert any(g.generation.finish_reason == "eos" for g in done.values()), "no row ended on an end id"


def test_the_batch_shrinks_as_rows_end_and_a_row_can_join_an_empty_one(model):
    """A row leaves the backend's batch with its RowDone; a sequence added after all ended starts afresh."""
    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=12)
    backend = TowerBackend(model)
    batch = Continuous(backend, cfg, [])  # no end ids: rows end at their max_new_tokens
    batch.add([PROMPTS[0]], 4)
    batch.add([PROMPTS[1], PROMPTS[2]], 8)
    sizes = []
    while len(batch):
        batch.step()
        sizes.append(backend.cache.batch if batch.rows else 0)
    assert sizes == [2, 0]
    batch.add([PROMPTS[3]], 4)
    (ev, fin) = batch.step()
    assert fin.generation.token_ids == alone(model, PROMPTS[3], cfg, 4, eos=[]).token_ids


def test_until_ends_a_row_with_stop_and_the_others_go_on(model):
    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=12)
    batch = Continuous(TowerBackend(model), cfg, [], until=lambda row, ids: row == 0 and len(ids) >= 4)
    batch.add([PROMPTS[0], PROMPTS[1]])
    done = {}
    while len(batch):
        done.update({e.row: e.generation for e in batch.step() if isinstance(e, RowDone)})
    assert done[0].finish_reason == "stop" and len(done[0].token_ids) == 4
    assert done[1].token_ids == alone(model, PROMPTS[1], cfg, 12, eos=[]).token_ids


def test_over_prefix_reuse_a_joined_batch_is_never_reused(model):
    """serve's backend is a PrefixReuse: after a join or a leave its state holds a batch, so the next
    sequence is read from scratch, and its tokens are still its own."""
    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=8)
    reuse = PrefixReuse(TowerBackend(model))
    batch = Continuous(reuse, cfg, [])
    batch.add([PROMPTS[0]])
    batch.step()
    batch.add([PROMPTS[1]])
    while len(batch):
        batch.step()
    assert reuse.held is None
    batch.add([PROMPTS[0] + [4]])
    out = [e for e in batch.step() + batch.step() if isinstance(e, RowDone)]
    assert out[0].generation.token_ids == alone(model, PROMPTS[0] + [4], cfg, 8, eos=[]).token_ids


def test_bad_additions_are_refused(model):
    batch = Continuous(TowerBackend(model), S.SamplingConfig(block_size=4))
    with pytest.raises(Exception, match="empty prompt"):
        batch.add([[]])
    with pytest.raises(Exception, match="at least 1"):
        batch.add([[5]], 0)
    assert len(batch) == 0 and batch.step() == []


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_rows_get_the_top_tokens_they_ask_for(model, mode):
    """A row added with top=k gets, per token, k (id, log p) best first, the first being its (greedy) token
    with its own confidence; a row added without gets none, and the same tokens as alone."""
    cfg = S.SamplingConfig(mode=mode, block_size=4, threshold=0.3, max_new_tokens=8)
    batch = Continuous(TowerBackend(model), cfg, [])
    batch.add([PROMPTS[0]], top=3)
    batch.add([PROMPTS[1]])
    seen = {0: [], 1: []}
    while len(batch):
        for ev in batch.step():
            if isinstance(ev, RowBlock):
                seen[ev.row].append(ev)
    for ev in seen[0]:
        assert len(ev.top) == len(ev.tokens)
        for tok, conf, top in zip(ev.tokens, ev.confidences, ev.top, strict=True):
            assert len(top) == 3 and top[0][0] == tok and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            assert top[0][1] == pytest.approx(math.log(conf), abs=1e-5)
    assert all(ev.top is None for ev in seen[1])
    assert [t for ev in seen[1] for t in ev.tokens] == alone(model, PROMPTS[1], cfg, 8, eos=[]).token_ids


def test_run_in_order_keeps_width_rows_and_yields_in_prompt_order(model):
    """Prompts ending at different lengths (their own end ids): at most `width` rows in the backend at any
    forward, the next prompts taking the places of ended ones; results in prompt order, each as alone."""
    from twotower_cli.batching import run_in_order

    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=12)
    free = [alone(model, p, cfg, 12, eos=[]).token_ids for p in PROMPTS]
    eos = [free[0][2], free[2][6]]  # two of them end early
    backend = Widths(model)
    got = list(run_in_order(Continuous(backend, cfg, eos), PROMPTS, width=3))
    assert [i for i, _, _ in got] == list(range(len(PROMPTS)))
    for (_, g, seconds), p in zip(got, PROMPTS, strict=True):
        assert g.token_ids == alone(model, p, cfg, 12, eos).token_ids and seconds > 0
    assert max(backend.widths) == 3 and backend.widths[0] == 3


def test_run_in_order_gives_each_prompt_its_own_max_new_tokens(model):
    from twotower_cli.batching import run_in_order

    cfg = S.SamplingConfig(mode="ar", max_new_tokens=12)
    lengths = [3, 12, 7, 1, 9, 5]
    got = list(run_in_order(Continuous(TowerBackend(model), cfg, []), PROMPTS, width=2, max_new=lengths))
    assert [len(g.token_ids) for _, g, _ in got] == lengths
    assert all(g.token_ids == alone(model, p, cfg, n, eos=[]).token_ids
               for (_, g, _), p, n in zip(got, PROMPTS, lengths, strict=True))


class _Interrupting(TowerBackend):
    """Ctrl-C from inside a step: a KeyboardInterrupt at the 2nd context feed (`at="extend"`: the one after
    the first block), or at the first denoiser forward after it (`at="denoise"`: in the second block)."""

    def __init__(self, model, at: str):
        super().__init__(model)
        self.at, self.extends = at, 0

    def extend(self, *args, **kwargs):
        self.extends += 1
        if self.at == "extend" and self.extends == 2:
            raise KeyboardInterrupt
        return super().extend(*args, **kwargs)

    def denoise(self, *args, **kwargs):
        if self.at == "denoise" and self.extends >= 2:
            raise KeyboardInterrupt
        return super().denoise(*args, **kwargs)


@pytest.mark.parametrize("at", ["extend", "denoise"])
def test_run_in_order_interrupted_gives_what_the_prompts_under_way_have(model, at):
    """Six prompts, three at a time, the first with max_new 4 (one block): interrupted as the first block's
    tokens go into the context, `unfinished()` has the first prompt's whole result (that step ended it but
    never returned) and the next two prompts' first blocks (finish_reason "interrupted"); interrupted in the
    second block, the first prompt was yielded, and the fourth, which joined for that block, has nothing
    yet: the two in between, as before. Each as the prompt alone with max_new 4 gives it."""
    from twotower_cli.batching import run_in_order

    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=12)
    results = run_in_order(Continuous(_Interrupting(model, at), cfg, []), PROMPTS, width=3,
                           max_new=[4] + [12] * (len(PROMPTS) - 1))
    yielded = []
    with pytest.raises(KeyboardInterrupt):
        for i, g, _ in results:
            yielded.append((i, g.token_ids))
    first = alone(model, PROMPTS[0], cfg, 4, eos=[])
    assert yielded == ([] if at == "extend" else [(0, first.token_ids)])
    rest = results.unfinished()
    want = ([(0, first.token_ids, "length")] if at == "extend" else []) + [
        (i, alone(model, PROMPTS[i], cfg, 4, eos=[]).token_ids, "interrupted") for i in (1, 2)]
    assert [(i, g.token_ids, g.finish_reason) for i, g, _ in rest] == want
    assert all(len(g.token_ids) == 4 and g.nfe >= 1 and seconds > 0 for _, g, seconds in rest)


@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar", "ar"])
def test_a_joining_sequence_starts_from_a_kept_snapshot(model, mode):
    """PrefixReuse.join_one: a sequence joining a running batch starts from the snapshot whose ids begin its
    prompt, reads only the rest, keeps a new snapshot at its history, and gets its tokens alone."""
    cfg = S.SamplingConfig(mode=mode, block_size=4, threshold=0.3, max_new_tokens=8)
    reuse = PrefixReuse(TowerBackend(model), keep=4)
    reuse.remember(PROMPTS[2][:5])  # an earlier turn's history
    batch = Continuous(reuse, cfg, [])
    batch.add([PROMPTS[0]])
    batch.step()
    history = PROMPTS[2][:7]
    fed = reuse.fed
    (row,) = batch.add([PROMPTS[2]], reuse=True, history=history)
    batch.admit()
    assert reuse.fed - fed == len(PROMPTS[2]) - 5 - (mode == "mock_ar")  # from the snapshot of 5 ids
    assert [ids for ids, _ in reuse.snapshots] == [history]  # it replaced the earlier turn's
    done = {}
    while len(batch):
        done.update({e.row: e.generation for e in batch.step() if isinstance(e, RowDone)})
    assert done[row].token_ids == alone(model, PROMPTS[2], cfg, 8, eos=[]).token_ids
    assert done[0].token_ids == alone(model, PROMPTS[0], cfg, 8, eos=[]).token_ids


def test_join_one_that_fails_leaves_the_batch_as_it_was(model, monkeypatch):
    reuse = PrefixReuse(TowerBackend(model))
    reuse.reset(2)
    reuse.extend(torch.tensor([PROMPTS[0][:3], PROMPTS[1] + [4]]))
    before = reuse.inner.cache
    monkeypatch.setattr(reuse.inner, "extend", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        reuse.join_one([5, 6, 7])
    assert reuse.inner.cache is before and reuse.held is None


@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar", "ar"])
def test_rows_with_their_own_settings_get_what_they_get_alone(model, mode):
    """Rows of one batch with their own threshold, policy, steps and temperature (one row samples, joining
    later): every greedy row gets its tokens alone with its settings, and the sampling row, the only one
    that draws from the batch's generator, the tokens of its seed alone."""
    base = S.SamplingConfig(mode=mode, block_size=4, threshold=0.3, max_new_tokens=12)
    own = [base, S.SamplingConfig(**{**base.__dict__, "threshold": 0.9, "steps": 2}),
           S.SamplingConfig(**{**base.__dict__, "policy": "factor", "factor": 2.0}),
           S.SamplingConfig(**{**base.__dict__, "policy": "topk", "steps": 3}),
           S.SamplingConfig(**{**base.__dict__, "temperature": 1.0, "top_p": 0.9, "steps": 2})]  # done first
    batch = Continuous(TowerBackend(model), base, [], torch.Generator().manual_seed(5))
    rows = [batch.add([p], settings=c)[0] for p, c in zip(PROMPTS[:4], own[:4], strict=True)]
    done = {}
    done.update({e.row: e.generation for e in batch.step() if isinstance(e, RowDone)})
    rows.append(batch.add([PROMPTS[4]], settings=own[4])[0])
    while len(batch):
        done.update({e.row: e.generation for e in batch.step() if isinstance(e, RowDone)})
    for row, p, c in zip(rows, PROMPTS[:5], own, strict=True):
        gen = torch.Generator().manual_seed(5) if c.temperature else None
        want = S.run(TowerBackend(model), [p], c, [], gen).generations[0]
        assert done[row].token_ids == want.token_ids and done[row].nfe == want.nfe, (mode, c)
    other_block = S.SamplingConfig(**{**base.__dict__, "block_size": 8})
    if mode == "mask_diffusion":  # the one mode that uses blocks: a batch's rows share its block
        with pytest.raises(ValueError, match="share block_size"):
            batch.add([PROMPTS[0]], settings=other_block)
    else:  # ar and mock_ar use none: a row of another block size joins, and gets what it gets alone
        row = batch.add([PROMPTS[0]], settings=other_block)[0]
        while len(batch):
            done.update({e.row: e.generation for e in batch.step() if isinstance(e, RowDone)})
        assert done[row].token_ids == S.run(TowerBackend(model), [PROMPTS[0]], other_block, []).generations[0].token_ids
