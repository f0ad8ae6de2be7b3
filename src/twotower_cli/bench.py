"""`twotower bench`: diffusion vs AR, side by side, from one run on the same prompts.

Rows: `ar` (the base model: context tower + its head, cached one-token decode), `mock_ar`, and
`mask_diffusion` at each threshold. Each row generates a continuation of every prompt, one prompt at a time
(latency, batch 1), `repeat` times; rows are interleaved within each repeat so that machine drift hits
them alike, and the median over repeats is reported. A short warm-up run precedes timing.

Quality is judged by the context tower (the AR model): the mean per-token log-likelihood of each row's
continuations, and `quality_vs_ar = exp(mean_ll(row) - mean_ll(ar))`, the ratio of the judge's
perplexities (1.0: as good as AR; lower is worse).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass

import torch

from twotower_cli import sampler as S
from twotower_cli.display import finite_json
from twotower_cli.errors import TwoTowerError
from twotower_cli.towers import TowerBackend, sequence_log_likelihood

DEFAULT_PROMPTS = [
    "ROMEO.\n",
    "And God said,",
    "KING HENRY.\n",
    "In the beginning",
    "JULIET.\n",
    "The LORD is my shepherd;",
    "HAMLET.\n",
    "Then said Jesus unto them,",
]


@dataclass
class Row:
    mode: str
    threshold: float | None
    tokens: int
    nfe: int
    tokens_per_nfe: float
    tokens_per_second: float
    seconds: float
    mean_log_likelihood: float
    speedup_vs_ar: float = 1.0
    quality_vs_ar: float = 1.0


def row_settings(mode: str, threshold: float | None, max_new_tokens: int, block: int, steps: int | None,
                 mask_token_id: int, pad_token_id: int) -> S.SamplingConfig:
    return S.SamplingConfig(mode=mode, block_size=block, steps=steps, threshold=0.8 if threshold is None else threshold,
                            max_new_tokens=max_new_tokens, mask_token_id=mask_token_id, pad_token_id=pad_token_id)


def row_configs(has_denoiser: bool, thresholds: list[float], *, max_new_tokens: int, block: int,
                steps: int | None, repeat: int = 1, batch_size: int = 1, mask_token_id: int = 3,
                pad_token_id: int = 0, vocab_size: int | None = None,
                ) -> tuple[list[tuple[str, float | None]], list[S.SamplingConfig]]:
    """The rows (mode, threshold) and their settings, checked; `vocab_size` None: before a model is loaded, as
    the bench command checks its options (a typo fails before a 60 GB load, not after). The mask_diffusion rows
    are checked first, so that a bad --steps is held to the block they use it in."""
    if repeat < 1:
        raise TwoTowerError(f"repeat {repeat} must be at least 1", "try --repeat 3")
    if batch_size < 1:
        raise TwoTowerError(f"batch size {batch_size} must be at least 1", "try --batch-size 1")
    specs: list[tuple[str, float | None]] = [("ar", None)]
    if has_denoiser:
        specs += [("mock_ar", None)] + [("mask_diffusion", float(t)) for t in thresholds]
    configs = [row_settings(m, t, max_new_tokens, block, steps, mask_token_id, pad_token_id) for m, t in specs]
    for c in sorted(configs, key=lambda c: c.mode != "mask_diffusion"):
        c.validate(vocab_size)
    return specs, configs


def run_bench(backend: TowerBackend, prompts: list[list[int]], *, max_new_tokens: int = 64, block: int = 16,
              steps: int | None = None, thresholds: list[float] = (0.5, 0.7, 0.8, 0.9), repeat: int = 3,
              mask_token_id: int = 3, pad_token_id: int = 0, eos_ids: list[int] = (),
              progress=None, batch_size: int = 1) -> list[Row]:
    """Measure every row, the prompts sampled `batch_size` at a time; `progress(done, total)` is called after
    each generation (each prompt) if given. tokens/NFE counts each sequence's own forwards, so a batch does
    not inflate it."""
    if not prompts:
        raise TwoTowerError("no prompts to benchmark", "give --prompts FILE with one prompt per line")
    specs, configs = row_configs(backend.twotower is not None, thresholds, max_new_tokens=max_new_tokens, block=block,
                                 steps=steps, repeat=repeat, batch_size=batch_size, mask_token_id=mask_token_id,
                                 pad_token_id=pad_token_id, vocab_size=backend.vocab_size)
    for c in configs:  # warm-up: allocator, lazy kernels, caches, --compile's compilations, --cuda-graphs' captures
        S.warm_up(backend, prompts[:batch_size], c, eos_ids)
    times: list[list[float]] = [[] for _ in specs]
    outputs: list[list[list[int]]] = [[] for _ in specs]
    tokens = [0] * len(specs)
    nfe = [0] * len(specs)
    total, done = repeat * len(specs) * len(prompts), 0
    for r in range(repeat):
        for i, c in enumerate(configs):
            seconds = 0.0
            for first in range(0, len(prompts), batch_size):
                batch = prompts[first:first + batch_size]
                fin = S.run(backend, batch, c, eos_ids)
                seconds += fin.wall_seconds
                if r == 0:
                    for g in fin.generations:
                        outputs[i].append(g.token_ids)
                        tokens[i] += len(g.token_ids)
                        nfe[i] += g.nfe
                done += len(batch)
                if progress:
                    progress(done, total)
            times[i].append(seconds)
    judge = backend.ar
    rows = []
    for i, (mode, thr) in enumerate(specs):
        # (eagerly under --compile: `towers.chunked_log_probs`)
        lls = [sequence_log_likelihood(judge, p, out) for p, out in zip(prompts, outputs[i], strict=True)]
        flat = torch.cat(lls) if lls else torch.zeros(0)
        mean_ll = float(flat.double().mean()) if flat.numel() else float("nan")
        sec = statistics.median(times[i])
        rows.append(Row(mode, thr, tokens[i], nfe[i], tokens[i] / max(nfe[i], 1), tokens[i] / max(sec, 1e-9), sec,
                        mean_ll))
    ar = rows[0]
    for row in rows:  # NaN where ar wrote no tokens, or this row wrote none (no likelihood): null in JSON
        row.speedup_vs_ar = row.tokens_per_second / ar.tokens_per_second if ar.tokens_per_second > 0 else math.nan
        row.quality_vs_ar = math.exp(row.mean_log_likelihood - ar.mean_log_likelihood)
    return rows


def machine_info(device: torch.device, dtype: torch.dtype | None = None) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        from twotower_cli.ops import kernels

        info["gpu"] = torch.cuda.get_device_name(device)
        info["kernels"] = kernels.describe()
        if dtype is not None:
            from twotower_cli.model import moe

            info["experts"] = moe.describe(device, dtype)
    return info


def rows_json(rows: list[Row]) -> list[dict]:
    """The rows as `--json` writes them: a number that could not be measured (a mode that wrote no tokens
    has no likelihood, nor a quality) is null."""
    return finite_json([asdict(r) for r in rows])
