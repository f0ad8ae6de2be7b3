"""Multi-turn chat over one sampler backend, with the context tower's state kept between turns (`twotower chat`).

Every turn the whole conversation is rendered (by the checkpoint's chat template, or, for a model without
one, as one running text) and encoded, and the sampler runs on those ids exactly as `generate` would. What
makes turn n+1 cheap is that the context tower has already read most of them:

    PrefixReuse   wraps the backend. When the sampler resets it and feeds a prompt, it feeds only the ids
                  past the longest state it holds whose ids are a prefix of the prompt: the live state (the
                  last turn's prompt and committed blocks), or a snapshot. Otherwise it reads the prompt
                  from scratch, as the plain backend does.
    Conversation  the turns so far; per turn the ids of the prompt and of the history before this turn's
                  additions (with a template: up to the user message, without the generation prompt). When
                  the live state does not begin the prompt, a snapshot is taken there: what survives a
                  template that renders a past reply differently from how it was generated (templates that
                  drop `<think>` content do).

A Mamba state cannot be rewound, so a state is reused only when all of its ids begin the new prompt. The
result is the tokens of a fresh run on the same ids, up to the rounding difference between one chunked
prefill and several shorter extends (`tests/test_chat.py` compares them). One sequence at a time: a batch
or a padded prompt is always read from scratch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from twotower_cli import sampler as S
from twotower_cli.errors import TwoTowerError
from twotower_cli.model.cache import TowerCache
from twotower_cli.text import ChatTemplate, StopTexts, Tokenizer
from twotower_cli.towers import TowerBackend


class PrefixReuse:
    """A sampler `Backend` that keeps what the context tower has read across `reset`s (module docstring).

    `held`: the ids the inner backend's cache holds (None once that is unknown: after a batch, a padded
    prompt, or an extend that did not finish). `snapshots`: up to `keep` of (ids, a copy of the cache after
    exactly those ids), least recently used first: one per conversation, so that a server keeps the
    conversations of several clients (a snapshot whose ids begin a newer one's is dropped for it). `fed`
    counts the ids fed to the context tower, all calls together."""

    def __init__(self, backend: TowerBackend, keep: int = 1):
        self.inner = backend
        self.vocab_size = backend.vocab_size
        self.held: list[int] | None = None
        self.keep = keep
        self.snapshots: list[tuple[list[int], TowerCache]] = []
        self.fed = 0  # ids fed to the context tower so far, all calls
        self._pending: int | None = None  # the batch size of a reset not applied yet

    def reset(self, batch: int) -> None:
        self._pending = batch  # applied by the next extend, which may reuse a state instead

    def extend(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        one = ids.shape[0] == 1 and attention_mask is None
        new = ids[0].tolist() if one else None
        if self._pending is not None:
            batch, self._pending = self._pending, None
            base = self._best_base(new, strict=True) if one else 0
            if base == 0:
                self._fresh(batch)
            ids = ids[:, base:]
            new = new[base:] if one else None
        before, self.held = self.held, None  # unknown until the extend below has finished
        logits = self.inner.extend(ids, attention_mask)
        self.fed += ids.shape[1]
        self.held = before + new if before is not None and new is not None else None
        return logits

    def denoise(self, block: torch.Tensor, t: torch.Tensor | None, rows: torch.Tensor | None = None,
                **padding) -> torch.Tensor:
        if self._pending is not None:  # mock_ar on a one-token prompt: no context to reuse
            self._fresh(self._pending)
            self._pending = None
        return self.inner.denoise(block, t, rows=rows, **padding)

    def join(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """`TowerBackend.join` (continuous batching, onto a batch already read): the cache then holds a batch,
        never reused."""
        self.held = None
        logits = self.inner.join(ids, attention_mask)
        self.fed += ids.shape[1]
        return logits

    def keep_rows(self, rows: list[int]) -> None:
        self.held = None
        self.inner.keep_rows(rows)

    def join_one(self, ids: list[int], history: list[int] | None = None) -> torch.Tensor | None:
        """Add one sequence to the running batch, reading only what no snapshot holds: its state is built
        aside as a request alone builds it (`start_from` with the batch's state out of the way, so from a
        snapshot; a snapshot kept at `history`), then stacked under the batch's rows. Its next-token
        logits [1, V] (None for no ids: mock_ar on a one-token prompt)."""
        self.held, self._pending = None, None
        try:
            with self.inner.aside():
                if history is not None and len(history) < len(ids) and ids[:len(history)] == history:
                    self.remember(history)
                if not ids:
                    self._fresh(1)
                    return None
                self.reset(1)
                return self.extend(torch.tensor([ids], dtype=torch.long))
        finally:
            self.held, self._pending = None, None

    def kept(self, ids: list[int]) -> int:
        """The length of the longest snapshot whose ids begin `ids` (and are fewer), 0 if none."""
        return max((len(k) for k, _ in self.snapshots if 0 < len(k) < len(ids) and ids[:len(k)] == k), default=0)

    def continues(self, ids: list[int]) -> bool:
        """Whether the live state is a start of `ids` (so feeding `ids` reads only what follows it)."""
        return bool(self.held) and len(self.held) < len(ids) and ids[:len(self.held)] == self.held

    @property
    def snapshot(self) -> tuple[list[int], TowerCache] | None:
        """The most recent snapshot."""
        return self.snapshots[-1] if self.snapshots else None

    def remember(self, ids: list[int]) -> None:
        """Bring the cache to exactly `ids` (reading only what no state holds) and keep a copy of it as the
        newest snapshot: it replaces the snapshots whose ids begin it (an earlier turn of the same
        conversation), and the least recently used goes when there are more than `keep`. Without autograd:
        `start_from` calls it outside the sampler, and a snapshot read with it would keep every activation of
        the read alive (under --cuda-graphs the MoE layers' grouped route, which autograd refuses, would fail
        the capture and end graphs for the session)."""
        self._pending = None
        base = self._best_base(ids, strict=False)
        if base == 0:
            self._fresh(1)
        if base < len(ids):
            with torch.no_grad():
                self.extend(torch.tensor([ids[base:]], dtype=torch.long))
        ids = list(ids)
        self.snapshots = [s for s in self.snapshots if not (len(s[0]) <= len(ids) and ids[:len(s[0])] == s[0])]
        self.snapshots = (self.snapshots + [(ids, self.inner.state())])[-self.keep:]

    def _best_base(self, ids: list[int], strict: bool) -> int:
        """Make the cache hold the longest known state whose ids begin `ids` (shorter than `ids` if `strict`:
        the caller needs the logits of a fed id); its length, 0 if none. A snapshot used becomes the most
        recently used."""
        def fits(prefix: list[int] | None) -> bool:
            return prefix is not None and 0 < len(prefix) and (len(prefix) < len(ids) if strict else
                                                                len(prefix) <= len(ids)) and ids[:len(prefix)] == prefix
        live = len(self.held) if fits(self.held) else 0
        best = max((s for s in self.snapshots if fits(s[0])), key=lambda s: len(s[0]), default=None)
        if best is not None and len(best[0]) > live:
            self.inner.restore(best[1])
            self.held = list(best[0])
            self.snapshots = [s for s in self.snapshots if s is not best] + [best]
            return len(best[0])
        return live

    def _fresh(self, batch: int) -> None:
        self.inner.reset(batch)
        self.held = [] if batch == 1 else None


@dataclass
class Turn:
    user: str
    reply: str  # the generated text before the end token (and before a stop text)
    generation: S.Generation
    prompt_tokens: int  # ids the model read for this turn: the whole conversation so far
    read_tokens: int  # of those, how many the context tower read this turn (the rest it held)
    reply_ids: list[int] | None = None  # the ids the reply is made of (default: the generation's)
    # what the model wrote, as a running text keeps it: the reply and the end token that stopped it, or the
    # tokens up to the one a stop text ends in (default: the generation's ids and end token)
    written: list[int] | None = None

    def __post_init__(self):
        g = self.generation
        if self.reply_ids is None:
            self.reply_ids = g.token_ids
        if self.written is None:
            self.written = g.token_ids + ([] if g.stop_id is None else [g.stop_id])


class Conversation:
    """The turns of one chat and how the model reads them.

    With a chat template: the messages (a system message first if given), rendered whole each turn with
    the generation prompt, encoded without added special tokens (as `generate --chat`). Without one: a
    running text; each user line is appended (after a newline unless the text already ends with one) and
    each reply, with the end token or the stop text that stopped it, follows as generated."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None, system: str | None = None,
                 variables: dict | None = None):
        if template is None and system is not None:
            raise TwoTowerError("a system message needs a chat template, and there is none",
                                "leave out the system message, or use a checkpoint with a chat template")
        self.tokenizer, self.template, self.system, self.variables = tokenizer, template, system, dict(variables or {})
        self.turns: list[Turn] = []
        self._ids: list[int] = []  # without a template: what the model has read and written so far

    def messages(self, user: str) -> list[dict]:
        """The conversation so far and then `user`'s message, as a chat template takes them."""
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        for turn in self.turns:
            head += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.reply}]
        return head + [{"role": "user", "content": user}]

    def prompt(self, user: str) -> tuple[list[int], list[int] | None]:
        """(the ids the model reads for this turn, the ids of the history where they begin those ids: where
        to keep a snapshot, or None). The history: with a template, the conversation up to this user
        message, without the generation prompt; without one, the text before this line."""
        if self.template is None:
            if not self._ids:
                return self.tokenizer.encode(user), None
            sep = "" if self.tokenizer.decode(self._ids[-1:]).endswith("\n") else "\n"
            return self._ids + self.tokenizer.encode(sep + user, add_special_tokens=False), list(self._ids)
        return template_ids(self.template, self.tokenizer, self.messages(user), self.variables)

    def add(self, turn: Turn) -> None:
        """Record a finished turn (`chat_turn` does)."""
        self.turns.append(turn)
        if self.template is None:  # the end token that stopped the reply is part of the text the model wrote
            self._ids = turn.generation.prompt_ids + turn.written

    def reset(self) -> None:
        self.turns.clear()
        self._ids = []


def template_ids(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict],
                 variables: dict) -> tuple[list[int], list[int] | None]:
    """A conversation's ids through a chat template (with the generation prompt, as `generate --chat`), and
    the ids of the same conversation without the generation prompt where they begin the first: the history
    a snapshot is kept at (`start_from`); None where they do not."""
    ids = tokenizer.encode(template.render(messages, **variables), add_special_tokens=False)
    try:
        history = tokenizer.encode(template.render(messages, add_generation_prompt=False, **variables),
                                   add_special_tokens=False)
    except TwoTowerError:  # a template may refuse a conversation that ends on a user turn without the prompt
        return ids, None
    return ids, (history if 0 < len(history) < len(ids) and ids[:len(history)] == history else None)


def start_from(backend: PrefixReuse, prompt: list[int], history: list[int] | None) -> None:
    """Before sampling on `prompt`: where the live state does not begin it, bring the cache to `history`
    (from the snapshot where it fits, else from scratch) and keep a copy there; then the sampler reads only
    what follows. Where the live state fits, nothing: one extend, no copy."""
    if history is not None and not backend.continues(prompt):
        backend.remember(history)


def chat_turn(backend: PrefixReuse, conversation: Conversation, user: str, cfg: S.SamplingConfig,
              eos_ids: list[int], generator: torch.Generator | None = None,
              stop_texts: StopTexts | None = None) -> Iterator[S.Event]:
    """One turn: the sampler's events for the reply to `user`. When the `Finished` event is yielded the
    turn is already in `conversation.turns`; a turn that does not finish (an interrupt) leaves no trace.

    Where the live state begins the prompt (a running text; a template that renders past replies as they
    were generated), the prompt's new ids are read in one call and no snapshot is taken. Where it does not
    (a template that drops `<think>` content; the turn after an interrupted one), the history is brought
    up from the snapshot, or read from scratch, and kept as the new snapshot.

    `stop_texts` end a reply once it writes one of them: the reply is the text before it (a template's
    assistant message too); a running text keeps what the model wrote through it."""
    prompt, history = conversation.prompt(user)
    fed = backend.fed
    start_from(backend, prompt, history)
    read = None
    until = None if stop_texts is None else stop_texts.until
    for ev in S.generate(backend, [prompt], cfg, eos_ids, generator, until):
        if read is None:  # the sampler feeds the prompt before its first event
            read = backend.fed - fed
        if isinstance(ev, S.Finished):
            g = ev.generations[0]
            reply, cut = (conversation.tokenizer.decode(g.token_ids), False) if stop_texts is None else \
                stop_texts.final(g.token_ids)
            conversation.add(Turn(user, reply, g, len(prompt), read,
                                  reply_ids=stop_texts.ids_before(g.token_ids, reply) if cut else None,
                                  written=stop_texts.ids_through(g.token_ids) if cut else None))
        yield ev
