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
                                                   "already in the Hugging Face cache.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
) -> None:
    """Summarise a NemotronH or TwoTower checkpoint and check its integrity (exit 1 on any problem).

    Reads safetensors headers, the index and config.json only; never downloads.
    """
    from twotower_cli.display import err_console, out_console
    from twotower_cli.hub import resolve
    from twotower_cli.inspect import inspect_checkpoint, render

    report = inspect_checkpoint(resolve(checkpoint, allow_download=False))
    if as_json:
        out_console().print(json.dumps(report.to_json(with_tensors=tensors), indent=2), markup=False, highlight=False)
    else:
        render(report, err_console(), tensors=tensors)
    if report.problems:
        raise typer.Exit(1)
