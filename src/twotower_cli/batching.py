"""Continuous batching: sequences join a running batch between blocks and leave it when they end (`serve`,
and `generate` over a prompt file without the live view: `run_in_order`).

`sampler.generate` runs a fixed batch from the first block to the last: a request that arrives meanwhile
waits for the whole batch, and a sequence that has ended still takes its place in every forward. Block
diffusion has a natural point to change the batch: between blocks, when every sequence's context tower has
read all it committed. `Continuous` works there (ar and mock_ar: between tokens):

    add(prompts, max_new_tokens)   queues sequences; the next `step` reads their prompts into the context
                                   tower as a batch of their own and stacks those rows after the running ones
                                   (`TowerBackend.join`: the shorter side is left-padded, and the padding is
                                   masked, so every row sees exactly its own tokens);
    step()                         one block (ar, mock_ar: one token) for every sequence; returns what it
                                   added to each (`RowBlock`) and a `RowDone` for each that ended (its end
                                   id, its `max_new_tokens`, or the caller's `until`); those leave the batch
                                   (`TowerBackend.keep_rows`) before the context tower reads the block.

Every sequence gets what `generate` gives it alone (the tests compare them), up to the rounding differences
that another batch shape can make. A sequence has its own `max_new_tokens` and sampling settings
(temperature, top-k/p, threshold, policy, factor, steps); a last block shorter than `block_size` (where
`max_new_tokens` is not a multiple of it) is padded on the right in the same forwards, the padding hidden
from the denoiser (`TwoTower.denoise(block_valid=...)`: its attention masks it, and its Mamba layers and
convs are causal), so it is what `generate`'s short last block is.

Besides the sampler's `Backend` calls, the backend needs `join(ids, attention_mask)`, `keep_rows(rows)` and
`denoise(..., block_valid=...)` (and `join_one` for `add(reuse=True)`): `towers.TowerBackend` and
`chat.PrefixReuse` have them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from twotower_cli import sampler as S
from twotower_cli.errors import TwoTowerError


@dataclass
class RowBlock:
    """What one step added to a sequence."""
    row: int  # the sequence's id, from `Continuous.add`
    start: int  # how many tokens it had generated before these
    tokens: list[int]
    confidences: list[float]  # each token's probability at the step that committed it
    top: list[list[tuple[int, float]]] | None = None  # per token: the most likely (id, log p) there, best first


@dataclass
class RowDone:
    row: int
    generation: S.Generation


SHARED = ("mode", "block_size", "mask_token_id", "pad_token_id", "stop_ids")  # settings every row of a batch has
BLOCK_ONLY = ("block_size", "mask_token_id")  # of those, the ones only mask_diffusion uses


def shared_settings(cfg: S.SamplingConfig) -> tuple:
    """The SHARED settings of `cfg` that a batch's rows must agree on: ar and mock_ar use no blocks and no
    mask id, so rows that differ only there can share a batch."""
    diffusion = cfg.mode == "mask_diffusion"
    return tuple(None if k in BLOCK_ONLY and not diffusion else getattr(cfg, k) for k in SHARED)


def _own(c: S.SamplingConfig) -> tuple:
    """The settings a row may have of its own: how it draws and how many tokens a step commits."""
    return (c.temperature, c.top_k, c.top_p, c.threshold, c.policy, c.factor, c.steps_per_block)


@dataclass(eq=False)
class _Row:
    id: int
    prompt: list[int]
    max_new: int
    cfg: S.SamplingConfig
    top: int = 0  # most likely tokens wanted per position (`RowBlock.top`)
    reuse: bool = False  # join through `backend.join_one` (a state kept for its prompt's start)
    history: list[int] | None = None  # where `join_one` keeps a state for the prompt's next turn
    ids: list[int] = field(default_factory=list)
    nfe: int = 0
    stopped: bool = False  # `until` ended it


def _filled(tokens: torch.Tensor, mask_id: int) -> int:
    """How many of a block's `tokens` come before its first slot left masked (all of them if none is)."""
    left = (tokens == mask_id).nonzero()
    return int(left[0, 0]) if len(left) else tokens.shape[0]


class Continuous:
    """A batch that sequences join and leave between steps (module docstring). `cfg` holds the settings all
    its sequences share; its `max_new_tokens` is only the default of `add`."""

    def __init__(self, backend: S.Backend, cfg: S.SamplingConfig, eos_ids: list[int] = (),
                 generator: torch.Generator | None = None, until: S.Until | None = None):
        cfg.validate(backend.vocab_size)
        self.backend, self.cfg, self.generator, self.until = backend, cfg, generator, until
        self.stops = S.stop_set(cfg, list(eos_ids))
        self._stop_ids = torch.tensor(sorted(self.stops), dtype=torch.long)  # `fill_block`: rows settle at one
        self.rows: list[_Row] = []  # in the backend's batch order
        self.waiting: list[_Row] = []
        self.nfe = 0  # forwards so far, all sequences together
        self._next_id = 0
        self._logits: torch.Tensor | None = None  # ar: each row's next-token logits [B, V]
        self._last: torch.Tensor | None = None  # mock_ar: each row's last token [B, 1], not yet in the context
        self._made: list[RowBlock | RowDone] = []  # the step's events so far; one interrupted leaves them here

    def __len__(self) -> int:
        """Sequences not ended yet, waiting ones included."""
        return len(self.rows) + len(self.waiting)

    def add(self, prompts: list[list[int]], max_new_tokens: int | None = None, top: int = 0,
            reuse: bool = False, history: list[int] | None = None,
            settings: S.SamplingConfig | None = None) -> list[int]:
        """Queue sequences to join at the next step; their ids (for `RowBlock`, `RowDone` and `until`).
        `top`: each of their tokens comes with the `top` most likely ones at its position (`RowBlock.top`)
        under the distribution its confidence is from (mask_diffusion: the denoiser's forward that committed
        it; ar, mock_ar: the next-token one). `reuse` (one prompt, admitted on its own: `admit` after `add`):
        if it joins a running batch, through `backend.join_one(ids, history)`, which may start it from a
        kept state (`chat.PrefixReuse`); a fresh batch reads its prompts through `reset` and `extend`, which
        may too. `settings`: their own
        temperature, top_k, top_p, threshold, policy, factor and steps (the rest as the batch's)."""
        cfg = self.cfg if settings is None else settings
        bad = [k for k, a, b in zip(SHARED, shared_settings(cfg), shared_settings(self.cfg), strict=True) if a != b]
        if bad:
            raise ValueError(f"a batch's rows share {', '.join(bad)}")
        cfg.validate(self.backend.vocab_size)
        n = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not prompts or any(len(p) == 0 for p in prompts):
            raise TwoTowerError("empty prompt", "give some text to continue")
        if n < 1:
            raise TwoTowerError(f"max-new-tokens {n} must be at least 1", "try 128")
        if reuse and len(prompts) != 1:
            raise ValueError("reuse is for one prompt at a time")
        rows = [_Row(self._next_id + i, list(p), n, cfg, top, reuse, history) for i, p in enumerate(prompts)]
        self._next_id += len(rows)
        self.waiting += rows
        return [r.id for r in rows]

    def step(self) -> list[RowBlock | RowDone]:
        """Admit the waiting sequences, then one block (ar, mock_ar: one token) for every sequence."""
        self._made = []
        with torch.no_grad():
            self.admit()
            if self.rows and self.cfg.mode == "mask_diffusion":
                self._block()
            elif self.rows:
                self._token()
        made, self._made = self._made, []
        return made

    def so_far(self) -> dict[int, S.Generation]:
        """By id, what each sequence has, for a caller that stops early (Ctrl-C, SIGTERM) and shows it: each
        one a step that did not return (an interrupt) had ended, the `Generation` that step would have returned
        in its `RowDone`; each one still in the batch or waiting, the ids it has so far (waiting: none), with
        finish_reason "interrupted"."""
        out = {r.id: S.Generation(r.prompt, r.ids[:S.first_stop(r.ids, self.stops)], "interrupted", r.nfe)
               for r in self.rows + self.waiting}
        out.update({ev.row: ev.generation for ev in self._made if isinstance(ev, RowDone)})
        return out

    def admit(self) -> None:
        """Read the waiting sequences' prompts into the batch now (`step` does it first anyway)."""
        if not self.waiting:
            return
        with torch.no_grad():
            self._admit()

    # ------------------------------------------------------------------------------------------ internals

    def _admit(self) -> None:
        new, self.waiting = self.waiting, []
        cfg, fresh = self.cfg, not self.rows
        feed = [r.prompt[:-1] if cfg.mode == "mock_ar" else r.prompt for r in new]
        ids, mask = S.left_pad(feed, cfg.pad_token_id)
        mask = None if bool(mask.all()) else mask
        if fresh:
            self.backend.reset(len(new))
            logits = self.backend.extend(ids, attention_mask=mask) if ids.shape[1] else None
        elif len(new) == 1 and new[0].reuse:
            logits = self.backend.join_one(feed[0], new[0].history)
        else:
            logits = self.backend.join(ids, attention_mask=mask)
        self.rows += new
        if cfg.mode == "ar":
            self.nfe += 1
            for r in new:
                r.nfe = 1  # the prompt's forward gave its first token
            logits = logits.float()
            self._logits = logits if fresh else torch.cat([self._logits, logits])
        elif cfg.mode == "mock_ar":
            last = torch.tensor([[r.prompt[-1]] for r in new], dtype=torch.long)
            self._last = last if fresh else torch.cat([self._last, last])

    def _block(self) -> None:
        cfg, B = self.cfg, len(self.rows)
        sizes = [min(cfg.block_size, r.max_new - len(r.ids)) for r in self.rows]
        size = max(sizes)
        # a row whose last block is shorter: padded on the right, in the same forwards (`fill_block`'s valid)
        valid = None if min(sizes) == size else torch.arange(size)[None, :] < torch.tensor(sizes)[:, None]
        own = [r.cfg for r in self.rows]
        shared = valid is None and all(_own(c) == _own(cfg) for c in own)
        steps = max(min(c.steps_per_block, n) for c, n in zip(own, sizes, strict=True))
        top = max(r.top for r in self.rows)
        x = torch.full((B, size), cfg.mask_token_id, dtype=torch.long)
        conf_at_commit = torch.zeros(B, size)
        top_ids = torch.zeros(B, size, top, dtype=torch.long)
        top_lps = torch.zeros(B, size, top)
        rows, until = self.rows, self.until

        def decided(j: int, prefix: list[int]) -> bool:  # a stop text written in the committed prefix
            return until is not None and until(rows[j].id, rows[j].ids + prefix)

        for masked, commit, conf, *alts in S.fill_block(self.backend, x, steps, cfg, self.generator, top,
                                                        None if shared else own, valid, self._stop_ids,
                                                        decided if until is not None else None):
            self.nfe += 1
            for j in masked.any(dim=-1).nonzero()[:, 0].tolist():  # rows still filling their block
                self.rows[j].nfe += 1
            conf_at_commit = torch.where(commit, conf, conf_at_commit)
            if top:
                top_ids = torch.where(commit[..., None], alts[0], top_ids)
                top_lps = torch.where(commit[..., None], alts[1], top_lps)
        # a row that settled (an end id, a stop text) keeps the slots after it masked: its tokens end before them
        sizes = [_filled(x[j, :n], cfg.mask_token_id) for j, n in enumerate(sizes)]
        ended = [self._add_tokens(r, x[j, :n].tolist(), conf_at_commit[j, :n].tolist(), top_ids[j, :n], top_lps[j, :n])
                 for j, (r, n) in enumerate(zip(self.rows, sizes, strict=True))]
        going = [j for j, e in enumerate(ended) if not e]
        self._leave(going)
        if going:  # rows that go on had a whole block (a shorter one is a row's last)
            self.backend.extend(x[going])

    def _token(self) -> None:
        if self.cfg.mode == "mock_ar":
            self._logits = self.backend.denoise(self._last, None)[:, -1].float()
            self.nfe += 1
            for r in self.rows:
                r.nfe += 1
        if all(_own(r.cfg) == _own(self.cfg) for r in self.rows):
            pred, conf = S.predict_to_host(self._logits, self.cfg, self.generator, exclude=None)
        else:
            pred, conf = S.predict_rows(self._logits, [r.cfg for r in self.rows], self.generator, None,
                                        torch.ones(len(self.rows), dtype=torch.bool))
        top = max(r.top for r in self.rows)
        top_ids, top_lps = (S.top_to_host(self._logits, top, exclude=None) if top else
                            (torch.zeros(len(self.rows), 0, dtype=torch.long), torch.zeros(len(self.rows), 0)))
        ended = [self._add_tokens(r, [t], [c], ids[None], lps[None])
                 for r, t, c, ids, lps in zip(self.rows, pred.tolist(), conf.tolist(), top_ids, top_lps, strict=True)]
        going = [j for j, e in enumerate(ended) if not e]
        tokens = pred[going][:, None]
        self._leave(going)
        if not going:
            return
        if self.cfg.mode == "ar":
            self._logits = self.backend.extend(tokens).float()
            self.nfe += 1
            for r in self.rows:
                r.nfe += 1
        else:
            self.backend.extend(self._last)  # `_leave` kept the going rows' last tokens
            self._last = tokens

    def _add_tokens(self, row: _Row, tokens: list[int], confidences: list[float], top_ids: torch.Tensor,
                    top_lps: torch.Tensor) -> bool:
        """Append a step's tokens to `row` (and, per token, the first `row.top` of `top_ids` / `top_lps`
        [tokens, k]) and note its events in the step's; whether it has ended."""
        top = None
        if row.top:
            top = [list(zip(i, v, strict=True)) for i, v in
                   zip(top_ids[:, :row.top].tolist(), top_lps[:, :row.top].tolist(), strict=True)]
        self._made.append(RowBlock(row.id, len(row.ids), tokens, confidences, top))
        row.ids += tokens
        eos = any(t in self.stops for t in tokens)
        row.stopped = not eos and self.until is not None and self.until(row.id, list(row.ids))
        ended = eos or row.stopped or len(row.ids) >= row.max_new
        if ended:
            self._made.append(RowDone(row.id, S.generation(row.prompt, row.ids, self.stops, row.stopped, row.nfe)))
        return ended

    def _leave(self, going: list[int]) -> None:
        """Go on with the rows at `going` only."""
        if len(going) == len(self.rows):
            return
        self.rows = [self.rows[j] for j in going]
        if going:
            self.backend.keep_rows(going)
            if self._logits is not None:
                self._logits = self._logits[going]
            if self._last is not None:
                self._last = self._last[going]
        else:
            self._logits = self._last = None


class InOrder:
    """`run_in_order`'s results: iterate (once) for them; `unfinished()` after an interrupt."""

    def __init__(self, batch: Continuous, prompts: list[list[int]], width: int = 16, max_new: list[int] | None = None):
        self.batch, self.prompts, self.width, self.max_new = batch, prompts, width, max_new
        self.index_of: dict[int, int] = {}  # row id -> prompt index, while not yielded
        self.started: dict[int, float] = {}  # row id -> when it was added
        self.ready: dict[int, tuple[S.Generation, float]] = {}  # by prompt index: ended, waiting for those before
        self.shown = 0  # prompts yielded

    def __iter__(self) -> Iterator[tuple[int, S.Generation, float]]:
        batch, prompts, width, max_new = self.batch, self.prompts, self.width, self.max_new
        queued = 0
        while self.shown < len(prompts):
            if len(batch) < width and queued < len(prompts):
                take = list(range(queued, min(len(prompts), queued + width - len(batch))))
                queued += len(take)
                now = time.perf_counter()
                rows = (batch.add([prompts[i] for i in take]) if max_new is None else
                        [row for i in take for row in batch.add([prompts[i]], max_new[i])])
                for row, i in zip(rows, take, strict=True):
                    self.index_of[row], self.started[row] = i, now
            for ev in batch.step():
                if isinstance(ev, RowDone):
                    self.ready[self.index_of.pop(ev.row)] = (ev.generation, time.perf_counter() - self.started.pop(ev.row))
            while self.shown in self.ready:
                self.shown += 1  # before the yield: the caller has it, even if it is interrupted handling it
                yield self.shown - 1, *self.ready.pop(self.shown - 1)

    def unfinished(self) -> list[tuple[int, S.Generation, float]]:
        """After an interrupt (Ctrl-C, SIGTERM; in a step or while the caller handled a result), what the
        prompts after the last one yielded have, as the iteration gives them: those that ended, their results;
        those under way, their ids so far (finish_reason "interrupted"; `Continuous.so_far`). Up to the first
        that has nothing to show (no ids yet, or never added), so that they stay a run in the prompts'
        order: prompts join in order, so one with no ids yet comes after every one that has some."""
        now = time.perf_counter()
        so_far = self.batch.so_far()
        have = dict(self.ready)
        for row, i in self.index_of.items():
            g = so_far.get(row)
            if g is not None and (g.token_ids or g.finish_reason != "interrupted"):
                have[i] = (g, now - self.started[row])
        out, i = [], self.shown
        while i in have:
            out.append((i, *have[i]))
            i += 1
        return out


def run_in_order(batch: Continuous, prompts: list[list[int]], width: int = 16,
                 max_new: list[int] | None = None) -> InOrder:
    """Sample every prompt in the (empty) `batch`, at most `width` sequences at a time: when sequences end, the
    next prompts take their places at the next step. Iterating the result yields (index, its generation,
    seconds from its admission to its end) in the prompts' order, each as soon as it and all before it are
    done; after an interrupt its `unfinished()` gives what the prompts under way have. `max_new`: each
    prompt's own max_new_tokens (default: the batch's)."""
    return InOrder(batch, prompts, width, max_new)
