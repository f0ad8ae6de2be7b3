"""`twotower tokenize`: text and JSONL files → one .npy token stream that `twotower train --data` memory-maps.

A corpus larger than memory then trains without being loaded, and the ranks of a `torchrun` job read one
file instead of each tokenizing the text. The stream is what `train` builds from the same files (documents
joined with EOS), so training on it equals training on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from twotower_cli.cli import app, guarded
from twotower_cli.commands import options as O


@app.command()
@guarded
def tokenize(
    checkpoint: Annotated[str | None, typer.Argument(
        metavar="CKPT", help="Checkpoint whose tokenizer, EOS and vocabulary to use: folder, hub id or alias.")] = None,
    more_data: O.MoreData = None,
    model: O.CheckpointModel = None,
    data: Annotated[list[Path] | None, typer.Option(
        "--data", metavar="FILE", help="Text file (one document) or .jsonl or .json file (JSON lines with a 'text' field), plain or .gz/.bz2/.xz, or a pipe of text "
                "(`<(zcat corpus.txt.gz)`); read in pieces, in bounded memory unless the tokenizer cannot cut a text (then held whole); repeatable.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "--output", "-o", metavar="OUT.npy", help="Output file (required).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the numbers on stdout.")] = False,
) -> None:
    """Tokenize text and JSONL files once into a .npy token stream for `train --data` (memory-mapped)."""
    import time

    from rich.markup import escape
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from twotower_cli import train as T
    from twotower_cli.checkpoint import check_writable
    from twotower_cli.config import NemotronHConfig
    from twotower_cli.display import err_console
    from twotower_cli.errors import TwoTowerError
    from twotower_cli.hub import resolve
    from twotower_cli.text import Tokenizer

    checkpoint, more_data = O.checkpoint_first(checkpoint, model, more_data, "tokenize")
    paths = [p.expanduser() for p in [*(data or []), *more_data]]  # `--data=~/x`: no shell expands that ~
    if out is None:
        raise TwoTowerError("no output file given", "pass -o OUT.npy")
    out = out.expanduser()
    if out.is_dir():  # --force or not: a folder is not replaced by a file (nor its contents lost)
        raise TwoTowerError(f"{out} is a folder", f"name the file to write, e.g. -o {out / 'tokens.npy'}")
    if out.suffix.lower() != ".npy":
        raise TwoTowerError(f"{out} does not end in .npy", f"use -o {out.with_suffix('.npy')}")
    if out.exists() and not force:
        raise TwoTowerError(f"{out} already exists", "pass --force to replace it")
    check_writable(out)
    if not paths:
        raise TwoTowerError("no data files given", "pass --data FILE (text or JSONL)")
    meta = T.token_file_meta(out)  # written beside OUT (an old one removed first)
    for p in paths:
        if p.suffix.lower() == ".npy":
            raise TwoTowerError(f"{p} is already tokenized", "pass it to `train --data` as it is")
        T.check_data_files([p])  # a pipe is fine (`--data <(zcat corpus.txt.gz)`): it is read once
        for written in (out, meta):  # the same file under another name (a link): writing it would replace the data
            if written.exists() and os.path.samefile(written, p):
                raise TwoTowerError(f"-o {out} would replace the data file {p}"
                                    + (f" (it is {written})" if written != out else ""),
                                    "choose another -o")
    folder = resolve(checkpoint, weights=False)  # config.json and the tokenizer: a hub id downloads no weights
    folder = folder.parent if folder.is_file() else folder
    cfg = NemotronHConfig.from_file(folder)
    tokenizer = Tokenizer(folder)
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    console = err_console()
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]tokenize"), TextColumn("{task.fields[docs]:,} documents"),
                  TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("tokenize", total=None, docs=0, tokens=0)
        tokens, documents, dtype = T.tokenize_to_file(
            paths, tokenizer, eos, cfg.vocab_size, out, progress=lambda d, n: bar.update(task, docs=d, tokens=n))
    seconds = time.perf_counter() - t0
    size = out.stat().st_size
    if as_json:
        print(json.dumps({"out": str(out), "documents": documents, "tokens": tokens, "dtype": str(dtype),
                          "bytes": size, "seconds": seconds}))
        return
    console.print(f"wrote [bold]{escape(str(out))}[/] · {documents:,} document{'s' * (documents != 1)} · {tokens:,} tokens ({dtype}, "
                  f"{size / 2**20:.1f} MiB) · {seconds:.1f} s · {tokens / max(seconds, 1e-9):,.0f} tok/s", highlight=False)
