"""`twotower split`: a NemotronH checkpoint → a TwoTower checkpoint (plan, then stream; see split.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from twotower_cli.cli import app, guarded
from twotower_cli.hub import aliases_help

_EPILOG = "SOURCE names:\n\n\b\n" + aliases_help()


@app.command(epilog=_EPILOG)
@guarded
def split(
    source: Annotated[str, typer.Argument(help="NemotronH checkpoint: folder, .safetensors file, hub repo id or alias.")],
    out_arg: Annotated[Path | None, typer.Argument(metavar="out", show_default=False,
                                                   help="Output folder, as -o gives it.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "--out", "-o", help="Output folder (default ./<name>-twotower).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB.")] = "5GB",
    mask_token_id: Annotated[int, typer.Option("--mask-token-id", help="Mask token id recorded in config.json.")] = 3,
    block_size: Annotated[int, typer.Option("--block-size", help="Diffusion block size recorded in config.json.")] = 16,
    dtype: Annotated[str, typer.Option("--dtype", help="keep | bf16 | fp16 | fp32 (keep copies bytes as they are).")] = "keep",
    verify: Annotated[bool, typer.Option("--verify", help="Re-read the output and compare every tensor with the source.")] = False,
) -> None:
    """Turn a pretrained NemotronH checkpoint into a TwoTower checkpoint (NVIDIA's published layout).

    Both towers and both heads are byte copies of the source; the time conditioning starts as the
    identity, so the fresh denoiser computes exactly the base model.
    """
    from twotower_cli.display import err_console
    from twotower_cli.errors import TwoTowerError
    from twotower_cli.hub import display_name, hub_cache_dir, local_or_hub, resolve
    from twotower_cli.split import SplitPlan, check_output, execute, load_source, plan_split

    console = err_console()
    if out_arg is not None and output is not None:
        raise TwoTowerError(f"two output folders given: {out_arg} and -o {output}", "give one of them")
    output = output if out_arg is None else out_arg
    name = display_name(source)
    out = output.expanduser() if output else Path(f"{name}-twotower")  # `-o=~/x`: no shell expands that ~

    def plan_for(path: Path, file_sizes: dict[str, int] | None = None) -> SplitPlan:
        plan = plan_split(*load_source(path, file_sizes), max_shard_size, dtype, mask_token_id, block_size,
                          source_name=source)
        check_output(out, plan.source_folder)  # before "already exists": --force must not be the way out
        return plan

    needs = []  # (bytes, where, what) for the free-space warning
    if (repo_id := local_or_hub(source, base=True)[1]) is not None:
        # A hub model not in the cache: plan from its headers first, so that a source split cannot take (a
        # TwoTower, a quantized or unsound checkpoint) and the disk it needs are said before a 63 GB download.
        from twotower_cli.remote import header_folder

        with header_folder(repo_id, as_path=repo_id == source) as (folder, got):
            plan = plan_for(folder, got.file_sizes)
        download = sum(got.file_sizes.values())
        needs.append((download, hub_cache_dir(), f"downloads {_gb(download)} into {hub_cache_dir()}"))
    else:
        plan = plan_for(resolve(source, base=True))
    if out.exists() and not force and not dry_run:  # before any output (atomic_output_dir checks again)
        raise TwoTowerError(f"{out} already exists", "pass --force to replace it, or choose another -o")
    _print_plan(plan, out, console)
    if repo_id is not None:
        console.print(f"[dim]• planned from the hub's headers ({_gb(got.bytes_read)} read): "
                      f"{'the real run first downloads' if dry_run else 'downloading'} {_gb(download)} of weights "
                      "into the Hugging Face cache[/]")
    _space_warning([(plan.total_bytes, out, f"writes {_gb(plan.total_bytes)} beside {out}"), *needs])
    _mask_warning(plan.config)
    if "tokenizer.json" not in plan.aux_files:  # the split output is sound, but generate stops at its first prompt
        from twotower_cli.cli import report_warning

        report_warning(f"{source} has no tokenizer.json: {out} will not generate, chat, serve or train until one "
                       "is put beside it", "copy the tokenizer files of the model it came from into it")
    if dry_run:
        _dry_run_end(out, force, console)
        return
    if repo_id is not None:  # the plan again, from the downloaded files (the hub may have changed since)
        plan = plan_for(resolve(source, base=True))

    from twotower_cli.display import byte_progress

    start = time.perf_counter()
    phases = {"verify": "split · verifying", "sync": "split · writing to disk"}  # after the copy's 100 %
    with byte_progress(console, "{task.description}") as progress:
        task = progress.add_task("split", total=plan.total_bytes - sum(len(s.header) for s in plan.shards))
        result = execute(plan, out, force=force, verify=verify, on_bytes=lambda n: progress.advance(task, n),
                         on_phase=lambda name: progress.update(task, description=phases[name]))
    _print_summary(plan, result, time.perf_counter() - start, console)


def _mask_warning(config: dict) -> None:
    """A `Warning:` when the mask id is one of the ids that end, begin or pad text (`--mask-token-id 2`: Nemotron's
    </s>): the denoiser would learn to fill blocks with that token, and generation would read it as the end."""
    from twotower_cli.cli import report_warning

    mask = (config.get("twotower") or {}).get("mask_token_id")
    for key, what in (("eos_token_id", "end"), ("bos_token_id", "beginning"), ("pad_token_id", "padding")):
        ids = config.get(key)
        if mask is not None and mask in (ids if isinstance(ids, list) else [ids]):
            report_warning(f"--mask-token-id {mask} is the model's {what} token ({key}): the denoiser would treat "
                           "that token as a mask", "use an id the model keeps for masks (Nemotron's <mask> is 3)")
            return


def _space_warning(needs: list[tuple[int, Path, str]]) -> None:
    """A `Warning:` for each disk with less free space than the run will write on it (`needs`: bytes, a path
    that will hold them, what writes them). The whole output lies beside OUT before it is renamed into place
    (an existing OUT goes only after), so all of it must fit at once; a download into the cache on the same
    disk adds to it. A full disk would stop the run (cleanly: nothing is left behind) after minutes of work."""
    from twotower_cli.checkpoint import short_of_space
    from twotower_cli.cli import report_warning

    for _total, whats, free in short_of_space(needs):
        report_warning(f"split {' and '.join(whats)}, and that disk has {_gb(free)} free",
                       "free some space or choose another -o (HF_HOME moves the cache): a full disk stops "
                       "the run, which leaves nothing behind")


def _dry_run_end(out: Path, force: bool, console) -> None:
    """What a dry run says after its plan: whether the real run would stop at, or replace, an existing output."""
    from rich.markup import escape

    if out.exists() and not force:  # the real run stops at "already exists": say so now
        from twotower_cli.cli import report_warning

        report_warning(f"{out} already exists: the real run needs --force to replace it",
                       "add --force, or choose another -o")
    elif out.exists():
        console.print(f"[dim]the real run replaces the existing {escape(str(out))}[/]", highlight=False)
    console.print("[dim]dry run: nothing written[/]")


def _gb(n: int) -> str:
    from twotower_cli.checkpoint import size_text

    return size_text(n)


def _print_plan(plan, out: Path, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]split[/] {escape(plan.source_name)} → {escape(str(out))}  ({len(plan.shards)} shard"
                  f"{'s' if len(plan.shards) > 1 else ''}, {_gb(plan.total_bytes)}, dtype {plan.dtype})")
    parts = Table(title="plan", title_justify="left")
    for col in ("part", "tensors", "parameters", "bytes"):
        parts.add_column(col, justify="left" if col == "part" else "right")
    labels = {"context": "context tower + context_lm_head", "denoiser": "denoiser tower + lm_head",
              "time": "time conditioning (identity)"}
    for part, p in plan.parts().items():
        parts.add_row(labels[part], f"{p['tensors']:,}", f"{p['parameters']:,}", _gb(p["bytes"]))
    console.print(parts)
    shards = Table(title="output shards", title_justify="left")
    for col in ("file", "tensors", "bytes"):
        shards.add_column(col, justify="left" if col == "file" else "right")
    for s in plan.shards:
        shards.add_row(s.file, f"{len(s.tensors):,}", _gb(s.size))
    console.print(shards)
    for line in [*plan.transforms, *plan.notes]:
        console.print(f"[dim]• {line}[/]")
    if plan.dropped:
        shown = ", ".join(map(escape, plan.dropped[:8])) + (f", ... ({len(plan.dropped) - 8} more)" if len(plan.dropped) > 8 else "")
        console.print(f"[dim]• dropped: {shown}[/]", soft_wrap=True)
    if plan.aux_files:
        console.print(f"[dim]• copied as they are: {', '.join(plan.aux_files)}[/]")


def _print_summary(plan, result, seconds: float, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"wrote {escape(str(result.out))}", title_justify="left")
    for col in ("part", "tensors", "bytes"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for part, p in plan.parts().items():
        table.add_row(part, f"{p['tensors']:,}", _gb(p["bytes"]))
    table.add_row("total", f"{len(plan.tensors):,}", _gb(result.bytes_written), style="bold")
    console.print(table)
    rate = result.bytes_written / seconds / 1e9 if seconds > 0 else 0.0
    console.print(f"{seconds:.2f} s, {rate:.2f} GB/s ({result.copy_method})")
    if result.bytes_verified:
        console.print(f"[green]✓ verified {_gb(result.bytes_verified)} of tensor data against the source[/]")
