"""`twotower eval`: how well a checkpoint predicts held-out text, the numbers to compare checkpoints by
without sampling.

- **AR**: the context tower and its head read each sequence causally; the mean negative log-likelihood of
  every token after the first, and its perplexity. For a fresh split this is the base model's.
- **Masked diffusion** (TwoTower checkpoints): the training objective (spec §8) on the same sequences, with
  the noise `train` evaluates with (`add_noise` from the seed, t per sequence or per block): the mean
  cross-entropy over the masked tokens, overall and by the block's masked fraction t (a denoiser is sure
  of a block that is mostly filled, t small, and unsure of one that is mostly masked). On the file `train`
  held out with `--eval-data` (all its sequences), with the same `--seq-len`, block, seed and noise, it is
  the eval loss `train` reports before its first step.

The sequences: the data packed as `train` packs it (EOS between documents, `seq_len` tokens, no sequence
across two files), the first `max_sequences` of them.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from twotower_cli.display import finite_json
from twotower_cli.errors import TwoTowerError, check_seed, check_whole, non_finite

T_EDGES = (0.25, 0.5, 0.75, 1.0)  # the t buckets' upper edges: (0, .25], (.25, .5], (.5, .75], (.75, 1]
AR_HEAD_ROWS = 2048  # rows of [.., vocabulary] logits at once in the AR measure (1 GiB of fp32 at Nano's 131,072)


@dataclass
class EvalResult:
    model: str
    sequences: int
    seq_len: int
    ar_nll: float  # mean over ar_tokens
    ar_tokens: int
    block: int | None = None  # None: a plain NemotronH checkpoint, AR only
    noise_per: str | None = None
    seed: int = 0
    diffusion_loss: float | None = None  # mean cross-entropy over the masked tokens
    masked_tokens: int = 0
    by_t: list[dict[str, Any]] = field(default_factory=list)  # {"t_max", "loss", "tokens"} per bucket
    seconds: float = 0.0

    @property
    def ar_perplexity(self) -> float:
        """exp(NLL); infinite past what a float holds (an NLL above ~709: a model sure of wrong tokens)."""
        return math.exp(self.ar_nll) if self.ar_nll < math.log(sys.float_info.max) else math.inf

    def to_json(self) -> dict[str, Any]:
        """The `--json` object; a perplexity too large for a float is null (JSON has no Infinity)."""
        return finite_json({**asdict(self), "ar_perplexity": self.ar_perplexity})


def evaluate(model: str | None, data: list[Path], *, seq_len: int = 512, block: int | None = None, batch: int = 8,
             max_sequences: int = 64, seed: int = 0, noise_per: str = "sequence", device: str | None = None,
             dtype: str = "auto", context_device: str | None = None, denoiser_device: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Both measures (module docstring) of the checkpoint `model` on the first `max_sequences` sequences of
    `data`, the towers on `device` or one on each of `context_device` and `denoiser_device` (as generate
    places them); `progress(done, total)` after each batch of each measure."""
    from twotower_cli import towers as TW
    from twotower_cli import train as T
    from twotower_cli.checkpoint import open_checkpoint
    from twotower_cli.config import NemotronHConfig
    from twotower_cli.model.loading import require_shards
    from twotower_cli.runtime import fetch_model, pick_dtype, placement
    from twotower_cli.text import Tokenizer

    t0 = time.perf_counter()
    data = [data] if isinstance(data, str | Path) else list(data)  # one path: it was read as its characters
    for name, value in (("seq_len", seq_len), ("batch", batch), ("max_sequences", max_sequences), ("seed", seed),
                        ("block", block)):
        check_whole(name, value)
    for name, value in (("--seq-len", seq_len), ("--batch", batch), ("--max-sequences", max_sequences)):
        if value < 1:
            raise TwoTowerError(f"{name} must be at least 1, not {value}", "leave it out for its default")
    if block is not None and block < 1:  # it read "--seq-len 512 is not a multiple of the block size 0"
        raise TwoTowerError(f"--block must be at least 1, not {block}", "leave it out for the checkpoint's block size")
    if seq_len < 2:
        raise TwoTowerError("--seq-len must be at least 2: the AR measure predicts each token after the first",
                            "try --seq-len 512")
    T.check_noise_per(noise_per)
    check_seed(seed)
    if not data:
        raise TwoTowerError("no data files given", "pass --data FILE (text, JSONL or a .npy token stream)")
    T.check_data_files(data)  # before a hub model is fetched (tens of GB)
    folder = fetch_model(model, None, device, dtype, context_device, denoiser_device)
    ckpt = open_checkpoint(folder)
    require_shards(ckpt)
    two = TW.is_twotower_checkpoint(ckpt)
    cfg = NemotronHConfig.from_dict(ckpt.config_raw)  # fetch_model made sure there is a config.json
    if two:
        if block is None:
            block = T.recorded_block(cfg, folder)[0]
        if seq_len % block:
            raise TwoTowerError(f"--seq-len {seq_len} is not a multiple of the block size {block}",
                                f"use e.g. --seq-len {max(1, seq_len // block) * block}")
    elif block is not None:
        raise TwoTowerError(f"{folder.name} is a plain NemotronH checkpoint: it has no denoiser to give a block",
                            "leave out --block (the AR measure needs none), or evaluate a TwoTower checkpoint")
    tok = Tokenizer(folder)
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    streams, _ = T.token_streams([Path(p) for p in data], tok, eos, cfg.vocab_size)
    seqs = T.Sequences(streams, seq_len)
    if not len(seqs):
        raise TwoTowerError(f"the data holds fewer tokens than one sequence of --seq-len {seq_len}",
                            "add data or lower --seq-len")
    ids = seqs[0:min(len(seqs), max_sequences)]
    dev, ctx, den = placement(device, context_device, denoiser_device)
    loaded = TW.load_model(folder, need_denoiser=two, dtype=pick_dtype(dtype, ctx), device=dev, context_device=ctx,
                        denoiser_device=den, check_memory=True)
    ar = loaded.ar if loaded.ar is not None else TW.causal_lm_view(loaded.twotower)  # the context tower and its head
    n = len(ids)
    total = math.ceil(n / batch) * (2 if two else 1)
    done = 0

    nll, ar_tokens = 0.0, 0
    head_rows = max(1, AR_HEAD_ROWS // batch)  # positions a head call covers: [batch, head_rows, V] logits at most
    with torch.no_grad():
        for start in range(0, n, batch):
            x = ids[start:start + batch].to(ar.lm_head.weight.device)
            for logp, target in TW.chunked_log_probs(ar, x, chunk=head_rows):
                nll -= float(logp.gather(-1, target[..., None]).double().sum())
            ar_tokens += x.shape[0] * (seq_len - 1)
            done += 1
            if progress:
                progress(done, total)
    if not math.isfinite(nll):
        raise non_finite("the context tower's log-probabilities", "there is no perplexity to report")
    result = EvalResult(str(folder), n, seq_len, nll / ar_tokens, ar_tokens, seed=seed)
    if not two:
        result.seconds = time.perf_counter() - t0
        return result

    towers = loaded.twotower
    gen = torch.Generator().manual_seed(T.derive_seed(seed, T._EVAL))
    noisy, mask, t = T.add_noise(ids, block, cfg.mask_token_id, gen, noise_per)
    denoiser = T.BlockDenoiser(towers)
    sums = [0.0] * len(T_EDGES)
    counts = [0] * len(T_EDGES)
    edges = torch.tensor(T_EDGES)
    with torch.no_grad():
        for start in range(0, n, batch):
            sl = slice(start, start + batch)
            x = ids[sl].to(towers.context_device)
            m = mask[sl]
            context = T.context_pass(towers.context_tower, x, block)
            context = T.BlockContext([TW.state_on(state, towers.denoiser_device) for state in context.layers], block)
            ce = denoiser(noisy[sl].to(towers.denoiser_device), t[sl].to(towers.denoiser_device), context,
                          x.to(towers.denoiser_device), m.to(towers.denoiser_device), reduction="none").double().cpu()
            t_of = t[sl].repeat_interleave(block, dim=1)[m]  # each masked token's block t
            bucket = torch.bucketize(t_of, edges)  # index of the first edge ≥ t
            for b in range(len(T_EDGES)):
                sel = bucket == b
                sums[b] += float(ce[sel].sum())
                counts[b] += int(sel.sum())
            done += 1
            if progress:
                progress(done, total)
    masked = sum(counts)
    if not math.isfinite(loss_sum := sum(sums)):
        raise non_finite("the denoiser's losses", "there is no diffusion loss to report")
    result.block, result.noise_per = block, noise_per
    result.diffusion_loss = loss_sum / max(masked, 1)
    result.masked_tokens = masked
    result.by_t = [{"t_max": e, "loss": s / c if c else None, "tokens": c} for e, s, c in zip(T_EDGES, sums, counts,
                                                                                           strict=True)]
    result.seconds = time.perf_counter() - t0
    return result
