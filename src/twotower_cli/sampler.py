"""Samplers as generators of typed events (spec §7): `mask_diffusion`, `mock_ar` and `ar`.

Ids in, ids out: the sampler never touches a tokenizer or the terminal. It drives a `Backend` (the model
side: prefill, extend, denoise) and yields `BlockStarted`, `Step`, `BlockDone` and finally `Finished`,
which carries one `Generation` per prompt. The live view and `--events` consume the same stream.

Batches: prompts of different lengths are left-padded; the padding is masked in attention and leaves the
Mamba states untouched, so a batch gives the tokens each prompt gives alone. Every sequence has its own
done flag (first EOS or stop id) and its own masked fraction t. The last block may be shorter than the
block size so any `max_new_tokens` works.

Commit rule (spec §7 step 3), per sequence and step s of `steps`:
    k = #(masked with confidence > threshold), at least 1, at least ceil(masked / (steps - s)),
        at most masked, and all masked on the last step.
`policy="topk"` drops the threshold term (LLaDA's fixed schedule); `policy="factor"` replaces it with
Fast-dLLM's rule: the largest n with (n + 1) * (1 - c_n) < factor over confidences sorted descending.

Randomness (temperature > 0): the Gumbel noise is drawn where the logits are, so a GPU step draws its
[B, S, V] uniforms on the GPU (2 M numbers a 16-token step of Nano: milliseconds on a CPU, plus the copy).
The caller's generator (a CPU one, `--seed`) draws the noise itself for CPU logits; for another device it
seeds, once, a generator on that device (`_generator_on`). So a seed reproduces a run on the same kind of
device, and a CPU and a GPU run of one seed sample differently (greedy decoding is the same on both).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from twotower_cli.errors import TwoTowerError, non_finite

Mode = Literal["mask_diffusion", "mock_ar", "ar"]
Policy = Literal["threshold", "topk", "factor"]
MODES = ("mask_diffusion", "mock_ar", "ar")
POLICIES = ("threshold", "topk", "factor")


class Backend(Protocol):
    """The model side of sampling. Context calls keep state between them; `reset` starts a new batch."""

    vocab_size: int

    def reset(self, batch: int) -> None: ...

    def extend(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ids [B, L] to the context tower; fp32 logits of the last position [B, V]."""
        ...

    def denoise(self, block: torch.Tensor, t: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Denoiser logits [B, S, V] for the block [B, S] after the current context; with `rows` (bool
        [B, S]) only those rows need to be computed (the others may hold anything)."""
        ...


# ---------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class SamplingConfig:
    mode: Mode = "mask_diffusion"
    block_size: int = 16
    steps: int | None = None  # per block; None → block_size
    threshold: float = 0.8
    policy: Policy = "threshold"
    factor: float = 1.0
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    mask_token_id: int = 3
    stop_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    @property
    def steps_per_block(self) -> int:
        return self.steps if self.steps is not None else self.block_size

    def validate(self, vocab_size: int | None) -> None:
        """A `TwoTowerError` for the first setting out of range; `vocab_size` None (before a model is
        loaded): token ids are only checked to be ids at all. Settings a mode does not use are checked too,
        each on its own (`--threshold 2` is an error in ar as well), but `steps` is held to `block_size`
        only in mask_diffusion, the one mode that uses either."""
        limit = vocab_size if vocab_size is not None else math.inf
        ids = f"(0..{vocab_size - 1})" if vocab_size is not None else "(ids are 0 or more)"
        bad_stops = [i for i in self.stop_ids if not 0 <= i < limit]
        diffusion = self.mode == "mask_diffusion"  # the one mode that uses block_size and steps
        too_many = diffusion and self.steps is not None and self.steps >= 1  # (else: below 1, whatever the block)
        checks = [  # (the setting, whether it is good, the message, which starts with the setting's name, a hint)
            ("mode", self.mode in MODES, f"mode {self.mode!r} is not one of {', '.join(MODES)}", "pick a --mode"),
            ("block_size", self.block_size >= 1, f"block size {self.block_size} must be at least 1", "try --block 16"),
            ("steps", self.steps is None or (self.steps >= 1 and (self.steps <= self.block_size or not diffusion)),
             f"steps {self.steps} must be "
             + (f"between 1 and the block size {self.block_size}" if too_many else "at least 1"),
             "steps per block cannot exceed the tokens in a block" if too_many
             else "try --steps 8" if diffusion else f"{self.mode} does not use it: leave it out"),
            ("threshold", 0.0 < self.threshold <= 1.0, f"threshold {self.threshold} must be in (0, 1]", "NVIDIA's operating point is 0.8"),
            ("policy", self.policy in POLICIES, f"policy {self.policy!r} is not one of {', '.join(POLICIES)}", "try --policy threshold"),
            ("factor", self.factor > 0, f"factor {self.factor} must be positive", "Fast-dLLM uses about 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, f"max-new-tokens {self.max_new_tokens} must be at least 1", "try 128"),
            ("temperature", 0 <= self.temperature < math.inf, f"temperature {self.temperature} must be a finite number >= 0",
             "0 is greedy"),
            ("top_k", self.top_k is None or self.top_k >= 1, f"top-k {self.top_k} must be at least 1", "or leave it out"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, f"top-p {self.top_p} must be in (0, 1]", "or leave it out"),
            ("mask_token_id", 0 <= self.mask_token_id < limit, f"mask token id {self.mask_token_id} is outside the vocabulary {ids}",
             "NVIDIA's mask id is 3"),
            ("stop_ids", not bad_stops, f"stop id {bad_stops[:1]} is outside the vocabulary {ids}", "--stop takes token ids"),
        ]
        for setting, ok, msg, hint in checks:
            if not ok:
                raise SettingError(setting, msg, hint)


class SettingError(TwoTowerError):
    """A sampling setting out of range: `setting` names the `SamplingConfig` field (serve names the request's
    field from it)."""

    def __init__(self, setting: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.setting = setting


# ---------------------------------------------------------------------------------------------- events

@dataclass
class BlockStarted:
    block: int  # index of the block (for ar/mock_ar: of the token)
    start: int  # offset of the block in the generated text
    size: int
    active: list[bool]  # per sequence: still generating


@dataclass
class Step:
    block: int
    step: int
    nfe: int  # forwards so far in this batch
    tokens: torch.Tensor  # [B, size] current block, mask ids where still masked
    committed: list[list[int]]  # per sequence: positions (within the block) committed at this step
    committed_tokens: list[list[int]]
    confidences: list[list[float]]


@dataclass
class BlockDone:
    block: int
    tokens: torch.Tensor  # [B, size]
    done: list[bool]


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # generated, cut before the first stop/EOS id
    # stop: the caller's `until` ended it; interrupted: what it had when a run was stopped (`Continuous.so_far`)
    finish_reason: Literal["eos", "length", "stop", "interrupted"]
    nfe: int  # forwards this sequence needed: while active and, in mask_diffusion, its block still had masks
    stop_id: int | None = None  # the stop/EOS id that ended it ("eos"), not part of token_ids


@dataclass
class Finished:
    generations: list[Generation]
    nfe: int  # forwards for the whole batch
    wall_seconds: float
    mode: str
    settings: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(g.token_ids) for g in self.generations)


Event = BlockStarted | Step | BlockDone | Finished
Until = Callable[[int, list[int]], bool]  # (sequence index, its generated ids so far) → end it now


# ---------------------------------------------------------------------------------------------- pieces

def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, Lmax] left-padded with pad_id, and the mask [B, Lmax] (True at real tokens)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, longest - len(p):] = True
    return ids, mask


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top-k and/or the smallest nucleus with mass ≥ top_p (the most likely token always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# id(the caller's generator) → (that generator, its companion generator on each other device it has drawn
# for). Not a WeakKeyDictionary: torch.Generator takes no weak references in some torch releases (2.11's
# CUDA build, seen on an H100). The generator is held so that its id stays its own while the entry lives;
# the least recently used entries go beyond _MAX_COMPANIONS (a request's generator in `serve` draws for
# one request, then is dropped by its caller).
_COMPANIONS: OrderedDict[int, tuple[torch.Generator, dict[torch.device, torch.Generator]]] = OrderedDict()
_MAX_COMPANIONS = 256


def _generator_on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The generator that draws on `device`: `generator` on its own device; on another, a generator there
    seeded once from `generator` (the same seed gives the same companion); None: torch's default there."""
    if generator is None or generator.device == device:
        return generator
    entry = _COMPANIONS.get(id(generator))
    if entry is None or entry[0] is not generator:
        entry = _COMPANIONS[id(generator)] = (generator, {})
        while len(_COMPANIONS) > _MAX_COMPANIONS:
            _COMPANIONS.popitem(last=False)
    _COMPANIONS.move_to_end(id(generator))
    per_device = entry[1]
    if device not in per_device:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        per_device[device] = torch.Generator(device=device).manual_seed(seed)
    return per_device[device]


def uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) of `shape`, drawn on `device` (module docstring: Randomness)."""
    return torch.rand(shape, generator=_generator_on(generator, device), device=device)


def seed_in_range(seed: int) -> bool:
    """Whether `torch.Generator.manual_seed` takes `seed`: a signed or unsigned 64-bit integer."""
    return -(1 << 63) <= seed < 1 << 64


TEMPERATURE_RANGE = (1e-30, 1e30)  # what a positive temperature is held to in `predict`


def predict(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None,
            exclude: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and confidence per position of fp32 logits [..., V].

    Temperature 0: argmax. Otherwise Gumbel-max on log_softmax(filtered logits / T). The confidence is
    the untempered probability of the predicted token. `exclude` (the mask id) can never be predicted.
    """
    logits = logits.float()
    if exclude is not None:
        logits = logits.clone()
        logits[..., exclude] = float("-inf")
    logp = F.log_softmax(logits, dim=-1)
    if cfg.temperature == 0:
        pred = logp.argmax(dim=-1)
    else:
        # T held within [1e-30, 1e30]: beyond fp32's range logits / T is ±inf or 0/0 and log_softmax NaN, whose
        # argmax is id 0 (a temperature of 1e-39 sampled <unk> every token); within it, nearer 0 is greedy and
        # nearer 1e30 uniform to fp32's precision anyway, and every other T divides as it is
        temperature = min(max(cfg.temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])
        scores = F.log_softmax(filter_logits(logits / temperature, cfg.top_k, cfg.top_p), dim=-1)
        u = uniform(scores.shape, generator, scores.device)
        gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
        pred = (scores + gumbel).argmax(dim=-1)
    conf = logp.gather(-1, pred[..., None])[..., 0].exp()
    return pred, conf


def predict_to_host(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None,
                    exclude: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`predict` where the logits are (the model's device), results on the CPU: on a GPU only the [B, S]
    predictions and confidences cross to the host, not [B, S, V] logits (8 MB per 16-token step of Nano's
    131,072-word vocabulary), and the softmax runs on the GPU. Logits with a NaN or +Inf make their confidence
    NaN: checked here, on the host copy (no extra sync), they raise rather than turn into text (argmax of a NaN
    row is an arbitrary id)."""
    pred, conf = predict(logits, cfg, generator, exclude)
    pred, conf = pred.cpu(), conf.cpu()
    if bool(conf.isnan().any()):
        raise non_finite("the model's logits", "its output would be noise")
    return pred, conf


def groups(items: list, key: Callable) -> list[tuple]:
    """Rows grouped by `key` of their items (settings), in order of first appearance: (one row's item, rows)."""
    out: dict[tuple, tuple] = {}
    for b, item in enumerate(items):
        out.setdefault(key(item), (item, []))[1].append(b)
    return list(out.values())


def _draws(c: SamplingConfig) -> tuple:
    return (c.temperature, c.top_k, c.top_p)


def predict_rows(logits: torch.Tensor, cfgs: list[SamplingConfig], generator: torch.Generator | None,
                 exclude: int | None, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`predict_to_host` where each row has its own settings (temperature, top_k, top_p), for the rows in
    `rows` (bool [B]) only (the others: id 0, confidence 0): one call per group of rows that share their
    settings, so a row draws its noise as it would alone when no other sampling row shares the generator."""
    together = groups(cfgs, _draws)
    if len(together) == 1 and bool(rows.all()):  # one call on the logits as they are: no gather
        return predict_to_host(logits, cfgs[0], generator, exclude)
    pred = torch.zeros(logits.shape[:-1], dtype=torch.long)
    conf = torch.zeros(logits.shape[:-1])
    for c, index in together:
        index = [b for b in index if rows[b]]
        if index:
            at = torch.tensor(index)
            pred[at], conf[at] = predict_to_host(logits[at.to(logits.device)], c, generator, exclude)
    return pred, conf


def top_to_host(logits: torch.Tensor, k: int, exclude: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely ids and their log-probabilities [..., k] per position of logits [..., V], under the
    same untempered distribution as `predict`'s confidence (`exclude` never counts), on the CPU: only those
    cross from the device."""
    logits = logits.float()
    if exclude is not None:
        logits = logits.clone()
        logits[..., exclude] = float("-inf")
    values, ids = F.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return ids.cpu(), values.cpu()


def commit_counts(conf: torch.Tensor, masked: torch.Tensor, step: int, steps: int, cfg: SamplingConfig) -> torch.Tensor:
    """How many masked positions each row commits at this step: k [B] (spec §7 step 3)."""
    n_masked = masked.sum(dim=-1)
    conf = conf.masked_fill(~masked, -1.0)
    if step >= steps - 1:
        return n_masked
    if cfg.policy == "threshold":
        k = (conf > cfg.threshold).sum(dim=-1)
    elif cfg.policy == "topk":
        k = torch.zeros_like(n_masked)
    else:  # factor: largest n with (n + 1) * (1 - c_n) < factor, c sorted descending (1-based n)
        c = torch.sort(conf, dim=-1, descending=True).values
        n = torch.arange(1, c.shape[-1] + 1, device=c.device)
        ok = ((n + 1) * (1 - c) < cfg.factor) & (c >= 0)
        # the largest n for which the rule holds at every n' <= n (confidences are sorted, so it is a prefix)
        k = torch.cumprod(ok.long(), dim=-1).sum(dim=-1)
    floor = torch.div(n_masked + (steps - step) - 1, steps - step, rounding_mode="floor")  # ceil
    k = torch.maximum(k, torch.maximum(floor, torch.ones_like(k)))
    return torch.minimum(k, n_masked)


def select_commits(conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean [B, S]: the k[b] most confident masked positions of each row."""
    score = conf.masked_fill(~masked, float("-inf"))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < k[:, None]) & masked


def _stop_ids(cfg: SamplingConfig, eos_ids: list[int]) -> torch.Tensor:
    return torch.tensor(sorted(stop_set(cfg, eos_ids)), dtype=torch.long)


def stop_set(cfg: SamplingConfig, eos_ids: list[int]) -> set[int]:
    """Every id that ends a sequence: the checkpoint's end ids and the user's stop ids."""
    return set(eos_ids) | set(cfg.stop_ids)


def first_stop(ids: list[int], stops: set[int]) -> int | None:
    """Index of the first id of `ids` in `stops`, or None: where a sequence's text ends."""
    for i, tok in enumerate(ids):
        if tok in stops:
            return i
    return None


def _ask_until(until: Until | None, out: torch.Tensor, done: torch.Tensor, stopped_at: list[int | None],
               mask_id: int | None = None) -> None:
    """Mark done every sequence still going whose generated ids `until` says end it, and note its length:
    up to its first `mask_id` (mask_diffusion: the slots a block left masked once `until` settled it)."""
    if until is None:
        return
    for b in (~done).nonzero()[:, 0].tolist():
        ids = out[b].tolist()
        if mask_id is not None and mask_id in ids:
            ids = ids[:ids.index(mask_id)]
        if until(b, ids):
            done[b] = True
            stopped_at[b] = len(ids)


# ---------------------------------------------------------------------------------------------- samplers

def generate(backend: Backend, prompts: list[list[int]], cfg: SamplingConfig, eos_ids: list[int] = (),
             generator: torch.Generator | None = None, until: Until | None = None) -> Iterator[Event]:
    """Sample continuations for a batch of prompts; yields events, ending with `Finished`.

    `until(i, ids)`, if given, is asked after each block (ar, mock_ar: each token) for every sequence i
    still going, with the ids it has generated so far (from the first block, stop ids included), and in
    mask_diffusion also before each step with the block's committed prefix added (`fill_block`'s
    `decided`); True ends that sequence as an end id would, with finish_reason "stop" and its ids uncut up
    to there (`serve` ends on stop strings this way and cuts the text itself). It must depend on the ids
    alone: it is asked about the same ids more than once."""
    cfg.validate(backend.vocab_size)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TwoTowerError("empty prompt", "give some text to continue")
    if outside := [i for p in prompts for i in p if not 0 <= i < backend.vocab_size][:1]:  # an IndexError in the
        raise TwoTowerError(f"prompt id {outside[0]} is outside the vocabulary (0..{backend.vocab_size - 1})",  # embedding
                            "prompt ids come from the model's tokenizer")
    with torch.no_grad():
        if cfg.mode == "mask_diffusion":
            yield from _mask_diffusion(backend, prompts, cfg, list(eos_ids), generator, until)
        else:
            yield from _one_token_at_a_time(backend, prompts, cfg, list(eos_ids), generator, until)


def generation(prompt: list[int], ids: list[int], stops: set[int], stopped: bool, nfe: int) -> Generation:
    """A sequence's `Generation` from the ids it generated: cut before its first stop id ("eos"), else
    "stop" if `until` ended it, else "length"."""
    cut = first_stop(ids, stops)
    if cut is not None:
        return Generation(prompt, ids[:cut], "eos", nfe, ids[cut])
    return Generation(prompt, ids, "stop" if stopped else "length", nfe)


def fill_block(backend: Backend, x: torch.Tensor, steps: int, cfg: SamplingConfig,
               generator: torch.Generator | None, top: int = 0, row_cfgs: list[SamplingConfig] | None = None,
               valid: torch.Tensor | None = None, stops: torch.Tensor | None = None,
               decided: Callable[[int, list[int]], bool] | None = None, **denoise) -> Iterator[tuple]:
    """Unmask the block `x` [B, S] (mask ids) in place over at most `steps` denoiser forwards (spec §7);
    after each yields (the masked slots it started from, those it committed, the confidences) [B, S] each,
    and with `top` > 0 the `top_to_host` ids and log-probabilities [B, S, top] of that forward.
    `row_cfgs`: each row's own settings (temperature, top_k, top_p; threshold, policy, factor; steps, at
    most `steps`), where `cfg` is only the mask id; a row whose block is filled draws nothing more.
    `valid` (bool [B, S], a prefix of each row; needs `row_cfgs`): rows whose blocks are shorter, padded on
    the right to S; the padding is never masked, counts in no t, and is hidden from the denoiser
    (`block_valid`), so each row gets what its shorter block gets alone. `stops` (the stop/end ids): a row
    whose block holds a committed stop id with every slot before it committed is settled — its text ends
    there, so the slots after it are left masked and it takes no more steps (nor counts in the yielded
    `masked`); the block ends when every row is filled or settled. `decided(b, prefix)`, if given, is asked
    before each step for every row still masked whose committed prefix (its slots before the first masked
    one) has grown since it was last asked (at the first step: the empty prefix); True settles the row the
    same way: its text is complete (a stop text is written, the sequence ended in an earlier block).
    `denoise`: passed on to `backend.denoise`."""
    sizes = [x.shape[1]] * x.shape[0] if valid is None else valid.sum(dim=-1).tolist()
    if valid is not None:
        denoise["block_valid"] = valid
    keys = None if row_cfgs is None else [(c, n) for c, n in zip(row_cfgs, sizes, strict=True)]

    def commit_key(item: tuple[SamplingConfig, int]) -> tuple:
        c, n = item
        return c.threshold, c.policy, c.factor, min(c.steps_per_block, n)

    asked = [-1] * x.shape[0]  # the prefix length each row was last asked `decided` about
    gone = torch.zeros(x.shape[0], dtype=torch.bool)  # rows `decided` settled
    for s in range(steps):
        masked = x == cfg.mask_token_id
        if valid is not None:
            masked &= valid
        if stops is not None:
            masked &= ~settled(x, masked, stops)[:, None]
        if decided is not None:
            for b in (masked.any(dim=-1) & ~gone).nonzero()[:, 0].tolist():
                prefix = int(masked[b].nonzero()[0, 0])
                if prefix > asked[b]:
                    asked[b] = prefix
                    gone[b] = decided(b, x[b, :prefix].tolist())
            masked &= ~gone[:, None]
        if not bool(masked.any()):
            return
        t = masked.float().mean(dim=-1) if valid is None else masked.sum(dim=-1) / torch.tensor(sizes)
        logits = backend.denoise(x, t, rows=masked, **denoise).float()
        if keys is None:
            pred, conf = predict_to_host(logits, cfg, generator, exclude=cfg.mask_token_id)
            k = commit_counts(conf, masked, s, steps, cfg)
        else:
            pred, conf = predict_rows(logits, row_cfgs, generator, cfg.mask_token_id, masked.any(dim=-1))
            k = torch.zeros(x.shape[0], dtype=torch.long)
            for item, index in groups(keys, commit_key):
                at = torch.tensor(index)
                k[at] = commit_counts(conf[at], masked[at], s, commit_key(item)[3], item[0])
        commit = select_commits(conf, masked, k)
        x.copy_(torch.where(commit, pred, x))
        yield (masked, commit, conf) + (top_to_host(logits, top, cfg.mask_token_id) if top else ())


def settled(x: torch.Tensor, masked: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """bool [B]: the rows of block `x` [B, S] whose text is decided: a committed stop id (in `stops`) with no
    slot of `masked` [B, S] before the first one."""
    pos = torch.arange(x.shape[1])
    first = torch.where(torch.isin(x, stops) & ~masked, pos, x.shape[1]).min(dim=-1).values
    return (first < x.shape[1]) & ~(masked & (pos < first[:, None])).any(dim=-1)


def _finish(prompts: list[list[int]], out: torch.Tensor, stops: set[int], stopped_at: list[int | None],
            nfe_per_seq: list[int], nfe: int, t0: float, cfg: SamplingConfig) -> Finished:
    # out[b, :stopped_at[b]]: the batch went on after `until` ended this one
    gens = [generation(p, out[b, :stopped_at[b]].tolist(), stops, stopped_at[b] is not None, nfe_per_seq[b])
            for b, p in enumerate(prompts)]
    return Finished(gens, nfe, time.perf_counter() - t0, cfg.mode, settings_record(cfg, stops))


def settings_record(cfg: SamplingConfig, stops: set[int]) -> dict:
    """The settings a run used, as `Finished.settings` (and `--json`) report them."""
    return {**cfg.__dict__, "steps": cfg.steps_per_block, "stop_ids": sorted(stops)}


def _mask_diffusion(backend: Backend, prompts: list[list[int]], cfg: SamplingConfig, eos_ids: list[int],
                    generator: torch.Generator | None, until: Until | None) -> Iterator[Event]:
    t0 = time.perf_counter()
    B = len(prompts)
    stops_t = _stop_ids(cfg, eos_ids)
    stops = set(stops_t.tolist())
    ids, mask = left_pad(prompts, cfg.pad_token_id)
    backend.reset(B)
    backend.extend(ids, attention_mask=None if bool(mask.all()) else mask)
    done = torch.zeros(B, dtype=torch.bool)
    stopped_at: list[int | None] = [None] * B  # length at which `until` ended a sequence
    out = torch.empty(B, 0, dtype=torch.long)
    nfe, nfe_per_seq = 0, [0] * B
    n_blocks = math.ceil(cfg.max_new_tokens / cfg.block_size)
    for blk in range(n_blocks):
        size = min(cfg.block_size, cfg.max_new_tokens - blk * cfg.block_size)
        steps = min(cfg.steps_per_block, size)
        active = ~done
        yield BlockStarted(blk, out.shape[1], size, active.tolist())
        x = torch.full((B, size), cfg.mask_token_id, dtype=torch.long)

        def decided(b: int, prefix: list[int], out: torch.Tensor = out, done: torch.Tensor = done) -> bool:
            """A sequence that ended in an earlier block takes no more steps; one that wrote a stop text in
            this block's committed prefix (`until`) takes none after it."""
            return bool(done[b]) or (until is not None and until(b, out[b].tolist() + prefix))

        for s, (masked, commit, conf) in enumerate(fill_block(backend, x, steps, cfg, generator, stops=stops_t,
                                                              decided=decided)):
            nfe += 1
            for b in (active & masked.any(dim=-1)).nonzero()[:, 0].tolist():  # rows still filling their block
                nfe_per_seq[b] += 1
            pos = [row.nonzero()[:, 0].tolist() for row in commit]
            yield Step(blk, s, nfe, x.clone(), pos, [x[b, p].tolist() for b, p in enumerate(pos)],
                       [conf[b, p].tolist() for b, p in enumerate(pos)])
        out = torch.cat([out, x], dim=1)
        done |= torch.isin(x, stops_t).any(dim=-1)
        _ask_until(until, out, done, stopped_at, cfg.mask_token_id)
        yield BlockDone(blk, x, done.tolist())
        if bool(done.all()) or blk == n_blocks - 1:
            break
        backend.extend(x)
    yield _finish(prompts, out, stops, stopped_at, nfe_per_seq, nfe, t0, cfg)


def _one_token_at_a_time(backend: Backend, prompts: list[list[int]], cfg: SamplingConfig, eos_ids: list[int],
                         generator: torch.Generator | None, until: Until | None) -> Iterator[Event]:
    """`ar`: the context tower and its head, cached one-token decode. `mock_ar`: the denoiser reads the
    last committed token at position n-1, seeded with the context state before it, and its logits give
    the next token; the context tower therefore runs one token behind."""
    t0 = time.perf_counter()
    B = len(prompts)
    stops_t = _stop_ids(cfg, eos_ids)
    stops = set(stops_t.tolist())
    mock = cfg.mode == "mock_ar"
    backend.reset(B)
    if mock:
        ids, mask = left_pad([p[:-1] for p in prompts], cfg.pad_token_id)
        if ids.shape[1]:
            backend.extend(ids, attention_mask=None if bool(mask.all()) else mask)
        last = torch.tensor([[p[-1]] for p in prompts], dtype=torch.long)
        logits = backend.denoise(last, None)[:, -1].float()
    else:
        ids, mask = left_pad(prompts, cfg.pad_token_id)
        logits = backend.extend(ids, attention_mask=None if bool(mask.all()) else mask).float()
    done = torch.zeros(B, dtype=torch.bool)
    stopped_at: list[int | None] = [None] * B  # length at which `until` ended a sequence
    tokens: list[torch.Tensor] = []
    nfe, nfe_per_seq = 1, [1] * B
    for i in range(cfg.max_new_tokens):
        yield BlockStarted(i, i, 1, (~done).tolist())
        pred, conf = predict_to_host(logits, cfg, generator, exclude=None)
        tok = pred[:, None]
        tokens.append(tok)
        yield Step(i, 0, nfe, tok.clone(), [[0]] * B, [[v] for v in pred.tolist()], [[c] for c in conf.tolist()])
        done |= torch.isin(pred, stops_t)
        if until is not None:
            _ask_until(until, torch.cat(tokens, dim=1), done, stopped_at)
        yield BlockDone(i, tok, done.tolist())
        if bool(done.all()) or i == cfg.max_new_tokens - 1:
            break
        if mock:
            backend.extend(last)
            last = tok
            logits = backend.denoise(last, None)[:, -1].float()
        else:
            logits = backend.extend(tok).float()
        nfe += 1
        for b in (~done).nonzero()[:, 0].tolist():
            nfe_per_seq[b] += 1
    out = torch.cat(tokens, dim=1) if tokens else torch.empty(B, 0, dtype=torch.long)
    yield _finish(prompts, out, stops, stopped_at, nfe_per_seq, nfe, t0, cfg)


def run(backend: Backend, prompts: list[list[int]], cfg: SamplingConfig, eos_ids: list[int] = (),
        generator: torch.Generator | None = None, until: Until | None = None) -> Finished:
    """Drain `generate` and return its `Finished` event."""
    result = None
    for ev in generate(backend, prompts, cfg, eos_ids, generator, until):
        if isinstance(ev, Finished):
            result = ev
    assert result is not None
    return result


def warm_up(backend: Backend, prompts: list[list[int]], cfg: SamplingConfig, eos_ids: list[int] = ()) -> float:
    """A short run of `cfg` on `prompts`, its result dropped, so that `--compile` compiles, and `--cuda-graphs`
    captures, the steps of the run that follows before it is timed: three blocks (mask_diffusion: denoiser
    steps and two block commits, since the first commit's past can be a length dynamo specializes, 0 or 1;
    ar, mock_ar: as many one-token steps). Several prompts: then the first alone too, as a batch of one is
    another size to dynamo (it specializes 1) and to a CUDA graph, and a batch of several ends as one when its
    rows end at different steps, or when fewer prompts are left than the batch holds (5 prompts, a batch of
    4: the 5th runs alone); without it every layer compiled again there, inside the run. Its own generator:
    what the caller's generator draws afterwards is the same as without it. Returns its seconds."""
    short = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, 3 * cfg.block_size))
    t0 = time.perf_counter()
    for batch in [prompts, prompts[:1]] if len(prompts) > 1 else [prompts]:
        run(backend, batch, short, eos_ids, torch.Generator().manual_seed(0))
    return time.perf_counter() - t0
