"""`twotower eval`: a checkpoint's AR perplexity and masked-diffusion loss on held-out text (`evaluate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from twotower_cli.cli import app, guarded
from twotower_cli.commands import options as O


@app.command("eval")
@guarded
def eval_(
    model: O.Model = None,
    more_data: O.MoreData = None,
    data: Annotated[list[Path] | None, typer.Option(
        "--data", metavar="FILE", help="Held-out text file or .jsonl or .json file (JSON lines with a 'text' field; plain or .gz/.bz2/.xz), pipe of text or .npy token stream from `twotower tokenize`; repeatable.")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence (a multiple of the block).")] = 512,
    block: Annotated[int | None, typer.Option(help="Diffusion block size (default: the checkpoint's twotower.block_size, else 16).")] = None,
    batch: Annotated[int, typer.Option("--batch", "--batch-size", help="Sequences per forward.")] = 8,
    max_sequences: Annotated[int, typer.Option("--max-sequences", help="Evaluate the first N sequences of the data.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the masks (train's evaluation noise with the same seed).")] = 0,
    noise_per: Annotated[str, typer.Option("--noise-per", help="sequence | block: one t per sequence (spec §8) or per block.")] = "sequence",
    device: O.Device = None,
    context_device: O.ContextDevice = None,
    denoiser_device: O.DenoiserDevice = None,
    dtype: O.Dtype = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """AR perplexity and masked-diffusion loss on held-out text: numbers to compare checkpoints by.

    The AR measure reads each sequence with the context tower and its head (a plain NemotronH checkpoint:
    the model). The masked-diffusion loss is the training objective with `train`'s evaluation noise: the
    mean cross-entropy over masked tokens, overall and by the block's masked fraction t.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from twotower_cli import train as T
    from twotower_cli.display import err_console
    from twotower_cli.evaluate import evaluate

    if model is None:  # `eval CKPT --data FILE`, as train takes it: the checkpoint goes with -m here
        T.check_data_files(more_data or [], "the checkpoint goes with -m, as in `twotower eval -m CKPT --data FILE`")
    files = [*(data or []), *(more_data or [])]
    console = err_console()
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task("batches", total=None)
        r = evaluate(model, files, seq_len=seq_len, block=block, batch=batch, max_sequences=max_sequences, seed=seed,
                     noise_per=noise_per, device=device, dtype=dtype, context_device=context_device,
                     denoiser_device=denoiser_device,
                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    if r.diffusion_loss is None:  # a plain NemotronH checkpoint: the masked-diffusion measure, which these shape,
        from twotower_cli.cli import (
            report_warning,  # did not run (--block is refused there: it names a denoiser)
        )

        for name in sorted(O.given("noise_per", "seed")):
            report_warning(f"--{name.replace('_', '-')}: no effect on {Path(r.model).name}, a plain NemotronH "
                           "checkpoint: eval gives the AR measure only", "leave it out")
    if as_json:
        print(json.dumps(r.to_json()))
        return
    def out(text: str) -> None:  # a line each, however narrow the terminal (soft wrap)
        console.print(text, highlight=False, soft_wrap=True)

    out(f"[bold]eval[/] · {Path(r.model).name} · {r.sequences} sequences × {r.seq_len} tokens")
    out(f"AR (context tower and its head): NLL {r.ar_nll:.4f} a token · perplexity {r.ar_perplexity:,.2f} "
        f"({r.ar_tokens:,} tokens)")
    if r.diffusion_loss is not None:
        out(f"masked diffusion (block {r.block}, t per {r.noise_per}, seed {r.seed}): loss {r.diffusion_loss:.4f} "
            f"over {r.masked_tokens:,} masked tokens")
        lo = 0.0
        parts = []
        for b in r.by_t:
            loss = "-" if b["loss"] is None else f"{b['loss']:.4f}"
            parts.append(f"t in ({lo:g}, {b['t_max']:g}]: {loss} ({b['tokens']:,})")
            lo = b["t_max"]
        out("  " + " · ".join(parts))
    out(f"[dim]{r.seconds:.2f} s[/]")
