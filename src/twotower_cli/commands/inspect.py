"""`twotower inspect`: what a checkpoint holds and whether it is sound, from its headers alone."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from twotower_cli.cli import app, guarded


@app.command()
@guarded
def inspect(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint folder, .safetensors file, or a hub id / alias "
                                                   "(from the cache, else its headers from the hub).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    remote: Annotated[bool, typer.Option("--remote", help="Read a hub model's headers from the hub even when "
                                                          "it is in the cache.")] = False,
    values: Annotated[bool, typer.Option("--values", help="Also read every tensor and count its NaN and Inf values "
                                                          "(reads all the weights; a local checkpoint).")] = False,
) -> None:
    """Summarise a NemotronH or TwoTower checkpoint and check its integrity (exit 1 on any problem).

    Reads safetensors headers, the index and config.json only (--values: every tensor too). A hub id or alias
    that is not in the cache is read from the hub: its headers and text files, a few MB; nothing is
    downloaded into the cache.
    """
    from twotower_cli.display import err_console, out_console
    from twotower_cli.errors import TwoTowerError
    from twotower_cli.hub import hub_model, hub_offline, is_local, local_or_hub, split_revision
    from twotower_cli.inspect import inspect_checkpoint, inspect_remote, render

    if remote:
        path, repo_id = None, hub_model(checkpoint)
        if repo_id is None:
            raise TwoTowerError(f"--remote reads a model on the Hugging Face hub, and {checkpoint} is "
                                + ("a local checkpoint" if is_local(checkpoint) else "not a hub id or alias"),
                                "drop --remote to inspect a local checkpoint, or name a hub id like nvidia/Name")
        if hub_offline():
            raise TwoTowerError("--remote reads from the Hugging Face hub, and HF_HUB_OFFLINE is set",
                                "unset HF_HUB_OFFLINE, or drop --remote to inspect the cached copy")
    else:
        path, repo_id = local_or_hub(checkpoint)
    if values and path is None:
        repo, revision = split_revision(str(repo_id))
        raise TwoTowerError(f"--values reads every byte of the weights, and {checkpoint} is "
                            + ("read from the hub (--remote)" if remote else "not in the Hugging Face cache"),
                            f"download it first (`hf download {repo}{f' --revision {revision}' if revision else ''}`)"
                            ", or drop --values to read its headers only")
    if path is not None and values:
        report = _with_progress(path)
    elif path is not None:
        report = inspect_checkpoint(path)
    else:
        assert repo_id is not None
        report = inspect_remote(repo_id, as_path=repo_id == checkpoint)
    if as_json:
        out_console().print(json.dumps(report.to_json(with_tensors=tensors), indent=2), markup=False, highlight=False)
    else:
        render(report, err_console(), tensors=tensors)
    if report.problems:
        raise typer.Exit(1)


def _with_progress(path):
    """`inspect_checkpoint(path, values=True)` with a progress bar of the bytes read, on a terminal."""
    from twotower_cli.display import byte_progress, err_console
    from twotower_cli.inspect import inspect_checkpoint

    console = err_console()
    with byte_progress(console, "reading values", disable=not console.is_terminal) as bar:
        task = bar.add_task("values", total=None)
        return inspect_checkpoint(path, values=True,
                                  on_bytes=lambda n, total: bar.update(task, total=total, advance=n))
