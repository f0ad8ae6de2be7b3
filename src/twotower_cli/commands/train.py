"""`twotower train`: teach a TwoTower's denoiser to fill masks (masked diffusion, spec §8).

Parses the options, calls `twotower_cli.train.train` and renders its events as a rich progress bar on
stderr (loss, eval loss, tokens/s, ETA). `--json` prints one JSON object on stdout at the end. Under
`torchrun` every rank runs this command; only rank 0 draws and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from twotower_cli.cli import app, guarded, report_warning
from twotower_cli.commands import options as O


class TrainProgress:
    """Draws `train` events: a progress bar with loss, eval loss, tokens/s and ETA, plus a line per
    evaluation and per save (printed above the bar, so logs of non-interactive runs keep them too)."""

    def __init__(self, log: Path | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.log = log  # --log: every event appended as a JSON line

        from twotower_cli.display import err_console

        self.console = err_console()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("eval [green]{task.fields[eval]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
            console=self.console, transient=False, disable=not self.console.is_terminal)
        self.task = None
        self.saved: int | None = None  # the step last saved

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, ev) -> None:
        from twotower_cli import train as T
        from twotower_cli.display import number
        from twotower_cli.errors import count

        if self.log is not None:
            self._write(ev)
        if isinstance(ev, T.Started):
            what = "resuming at step" if ev.start_step else "starting at step"
            self.console.print(
                f"[dim]{what} {ev.start_step} of {ev.total_steps} · {ev.trainable_parameters:,} trained / "
                f"{ev.frozen_parameters:,} frozen parameters · {ev.train_sequences} train + {ev.eval_sequences} "
                f"eval sequences · {ev.tokens_per_step:,} tok/step · {count(ev.world_size, 'process', 'processes')} on {ev.device}[/]")
            self.task = self.progress.add_task("train", total=ev.stop_step, completed=ev.start_step,
                                               loss="-", eval="-", tps="-")
        elif isinstance(ev, T.StepDone):
            self.progress.update(self.task, completed=ev.step, loss=number(ev.loss, ".4f"),
                                 tps=f"{ev.tokens / max(ev.seconds, 1e-9):,.0f}")
        elif isinstance(ev, T.Evaluated):
            self.progress.update(self.task, eval=number(ev.loss, ".4f"))  # "-", never "nan", as the summary says it
            self.progress.console.print(f"[dim]step {ev.step}: eval loss {number(ev.loss, '.4f')}[/]")
        elif isinstance(ev, T.Saved):
            self.saved = ev.step
            self.progress.console.print(f"[dim]step {ev.step}: saved {ev.path}[/]")
        elif isinstance(ev, T.Warned):
            report_warning(ev.message, ev.hint)


    def _write(self, ev) -> None:
        import dataclasses
        import time

        from twotower_cli.display import finite_json

        kind = {"Started": "started", "StepDone": "step", "Evaluated": "eval", "Saved": "saved",
                "Warned": "warning"}[type(ev).__name__]
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(ev).items()}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(json.dumps(finite_json({"event": kind, "time": round(time.time(), 3), **fields})) + "\n")


@app.command()
@guarded
def train(
    checkpoint: Annotated[str | None, typer.Argument(
        metavar="CKPT", help="TwoTower checkpoint to train: folder, hub id or alias.")] = None,
    more_data: O.MoreData = None,
    model: O.CheckpointModel = None,
    data: Annotated[list[Path] | None, typer.Option(
        "--data", metavar="FILE", help="Text file (one document), .jsonl or .json file (JSON lines with a 'text' field), plain or .gz/.bz2/.xz, or .npy token stream from `twotower tokenize` (memory-mapped); a pipe of text (`<(zcat corpus.txt.gz)`) in one process; repeatable.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "--output", "-o", metavar="OUT", help="Output checkpoint folder (required).")] = None,
    block: Annotated[int | None, typer.Option(help="Diffusion block size S (sample with the same or smaller; default: the checkpoint's twotower.block_size, else 16).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training sequence (a multiple of --block).")] = 512,
    batch: Annotated[int, typer.Option("--batch", "--batch-size", help="Sequences per micro-batch (per process).")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-4,
    steps: Annotated[int, typer.Option(help="Optimizer steps (length of the schedule).")] = 1000,
    warmup: Annotated[int | None, typer.Option(help="Linear warmup steps (default: min(100, steps/10)).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order and the noise.")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: only before and after).")] = 100,
    save_every: Annotated[int, typer.Option("--save-every", help="Save every N steps (0: only at the end).")] = 500,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the training saved in OUT (a fresh start if OUT does not exist); not with --force.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT (never the checkpoint, the current folder or a folder holding them or the data).")] = False,
    train_what: Annotated[str, typer.Option("--train", help="all | time-conditioning")] = "all",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="Context tower dtype: auto | fp32 | bf16 | fp16 (trained weights stay fp32).")] = "auto",
    stop_after: Annotated[int | None, typer.Option("--stop-after", help="Stop (and save) after step N of the --steps schedule; continue with --resume.")] = None,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Shard both towers, gradients and optimizer state over the torchrun ranks (FSDP2), for models too large for one device.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Keep only each denoiser layer's input and run the layer again in backward: several times less activation memory for a slower step (benchmarks/train_step.py).")] = False,
    compute_dtype: Annotated[str, typer.Option("--compute-dtype", help="fp32 | bf16: what the trained part computes in (fp32 masters and gradient reduction either way); bf16 needs --fsdp.")] = "fp32",
    noise_per: Annotated[str, typer.Option("--noise-per", help="sequence | block: draw the noise level t once per sequence (spec §8, as NVIDIA trains) or once per block.")] = "sequence",
    eval_data: Annotated[list[Path] | None, typer.Option("--eval-data", metavar="FILE", help="Held-out file (text, JSONL or .npy) to evaluate on; repeatable (default: the last 5 % of --data).")] = None,
    log: Annotated[Path | None, typer.Option("--log", metavar="FILE", help="Append every event (start, step with loss, lr and tokens, evaluation, save) as a JSON line to FILE.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the results on stdout.")] = False,
) -> None:
    """Train the denoiser by masked diffusion; the context tower stays frozen."""
    from twotower_cli import train as T
    from twotower_cli.display import err_console, number
    from twotower_cli.errors import TwoTowerError, count

    checkpoint, more_data = O.checkpoint_first(checkpoint, model, more_data, "train")
    if out is None:
        raise TwoTowerError("no output folder given", "pass -o OUT")
    if log is not None:  # each save replaces OUT whole: a log inside it would be deleted at every save
        from twotower_cli.checkpoint import check_output_folder

        check_output_folder(out, None, inputs=[("--log file", log)])
        T.check_log_file(log, checkpoint, [*(data or []), *more_data], list(eval_data or []))
    both = sorted({str(p) for p in eval_data or [] if any(T.same_file(p, d) for d in [*(data or []), *more_data])})
    if both:  # the held-out measure would be of text the run trains on
        from twotower_cli.cli import report_warning

        report_warning(f"--eval-data {', '.join(both)} is also --data: the eval loss measures text the run trains on",
                       "hold out a file of its own, or leave out --eval-data (the last 5 % of --data is held out)")
    cfg = T.TrainConfig(checkpoint=checkpoint, data=[*(data or []), *more_data], out=out, block=block,
                        seq_len=seq_len, batch=batch, grad_accum=grad_accum, lr=lr, steps=steps, warmup=warmup,
                        seed=seed, eval_every=eval_every, save_every=save_every, resume=resume, force=force,
                        train=train_what, device=device, dtype=dtype, stop_after=stop_after, fsdp=fsdp,
                        gradient_checkpointing=gradient_checkpointing, compute_dtype=compute_dtype,
                        noise_per=noise_per, eval_data=list(eval_data or []))
    with TrainProgress(log) as view:
        try:
            result = T.train(cfg, on_event=view)
        except T.OtherRankReports:  # another rank of the torchrun job (rank 0) says the same: exit 1 quietly
            raise typer.Exit(1) from None
        except KeyboardInterrupt:  # OUT holds the last save whole (each replaces it atomically): say which
            if view.saved is None:
                raise TwoTowerError("interrupted before the first save", f"{out} was not written" + (
                    "" if not out.exists() else " (it holds what it held before)")) from None
            raise TwoTowerError(f"interrupted; {out} holds step {view.saved}",
                                "continue with the same command and --resume") from None
    if not result.is_main:
        return
    first, final, before, after = (number(x, ".4f") for x in (result.first_loss, result.final_loss,
                                                               result.eval_loss_before, result.eval_loss_after))
    err_console().print(  # tok/s: this invocation's tokens over its time in optimizer steps (TrainResult)
        f"[dim]steps {result.start_step}→{result.steps} · {result.tokens:,} tokens in {result.train_seconds:.1f} s of "
        f"steps: {result.tokens_per_second:,.0f} tok/s · loss {first} → {final} · eval {before} → {after} · "
        f"{result.seconds:.1f} s in all · "
        + (f"saved {result.out}[/]" if result.steps > result.start_step else  # a finished run, resumed: no step ran
           f"nothing to do: {result.out} holds step {result.steps} of {result.steps} (raise --steps to train on)[/]")
        + (f" [yellow]· {count(result.skipped_steps, 'step')} skipped (loss or gradients not finite)[/]"
           if result.skipped_steps else ""))
    if as_json:
        print(json.dumps(result.to_json()), flush=True)
