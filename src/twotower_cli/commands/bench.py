"""`twotower bench`: diffusion vs AR tok/s, NFE and quality, side by side from one run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from twotower_cli.cli import app, guarded, report_warning
from twotower_cli.commands import options as O


@app.command()
@guarded
def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint folder, hub id or alias (default: the embedded tiny model).")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", "--prompt-file", help="Prompt file: one per line, or JSONL with prompt/text (with --chat: or a messages list); - reads stdin (default: built-in prompts).")] = None,
    chat: O.Chat = False,
    system: O.System = None,
    chat_arg: O.ChatArg = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens per continuation.")] = 64,
    block: Annotated[int | None, typer.Option(help="Diffusion block size (default: the block the checkpoint's denoiser was trained with, else 16).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoiser steps per block (default: the block size).")] = None,
    thresholds: Annotated[str, typer.Option("--thresholds", "--threshold", help="Comma-separated mask_diffusion thresholds.")] = "0.5,0.7,0.8,0.9",
    repeat: Annotated[int, typer.Option(help="Timed repeats per row (median reported).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Prompts sampled together (tok/s of the whole batch; tok/NFE per sequence).")] = 1,
    device: O.Device = None,
    context_device: O.ContextDevice = None,
    denoiser_device: O.DenoiserDevice = None,
    dtype: O.Dtype = "auto",
    compile: O.Compile = False,
    cuda_graphs: O.CudaGraphs = False,
    threads: O.Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object on stdout.")] = False,
) -> None:
    """Measure ar, mock_ar and mask_diffusion (per threshold) on the same prompts, side by side."""
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    from twotower_cli.bench import DEFAULT_PROMPTS, machine_info, row_configs, rows_json, run_bench
    from twotower_cli.checkpoint import open_checkpoint
    from twotower_cli.display import err_console, number
    from twotower_cli.errors import TwoTowerError, count
    from twotower_cli.model.loading import require_shards
    from twotower_cli.runtime import fetch_model, open_runtime
    from twotower_cli.text import read_prompts, render_chats
    from twotower_cli.towers import is_twotower_checkpoint

    O.check_max_new_tokens(max_new_tokens)  # before the (slow) load, with bench's own default as the hint
    try:
        thr = [float(x) for x in thresholds.split(",") if x.strip()]
    except ValueError:
        raise TwoTowerError(f"cannot read thresholds {thresholds!r}", "write them like 0.5,0.7,0.8,0.9") from None
    if not thr:  # ran ar and mock_ar only, without a word: the rows the bench is for were gone
        raise TwoTowerError(f"no thresholds in {thresholds!r}", "write them like 0.5,0.7,0.8,0.9")
    if len(set(thr)) < len(thr):  # each was measured (and printed) as often as written
        twice = sorted({t for t in thr if thr.count(t) > 1})
        thr = list(dict.fromkeys(thr))
        report_warning(f"--thresholds gives {', '.join(map(str, twice))} more than once: measured once",
                       "--repeat measures each row more times")
    # the rows' settings before the (slow) download and load, as generate checks its own (run_bench checks them
    # again against the checkpoint's block); --steps only once the checkpoint is known: a plain NemotronH one
    # runs no row that uses it
    row_options = dict(max_new_tokens=max_new_tokens, block=O.block_before_load(block, steps), repeat=repeat,
                       batch_size=batch_size)
    row_configs(True, thr, steps=None, **row_options)
    variables = O.template_variables(chat, system, chat_arg)
    texts = list(DEFAULT_PROMPTS) if prompts is None else read_prompts(None, prompts, conversations=chat)  # as generate
    folder = fetch_model(model, None, device, dtype, context_device, denoiser_device)
    if chat:  # before the (slow) load: a missing or broken template fails fast
        texts = render_chats(folder, texts, system, variables)
    ckpt = open_checkpoint(folder)
    require_shards(ckpt)  # a TwoTower checkpoint that lost its denoiser shards is no plain NemotronH one
    two = is_twotower_checkpoint(ckpt)  # a plain NemotronH checkpoint benches `ar` only
    row_configs(two, thr, steps=steps, **row_options)
    if not two:
        from twotower_cli.sampler import SamplingConfig

        only_ar = f"on {folder.name}, a plain NemotronH checkpoint: bench times ar only"
        O.warn_if_options_unused(SamplingConfig(mode="ar"), O.given("block", "steps"), why=only_ar)
        if O.given("thresholds"):  # the mask_diffusion rows' thresholds
            report_warning(f"--thresholds: no effect {only_ar}", "leave it out")
    rt = open_runtime(str(folder), need_denoiser=two, device=device, dtype=dtype, context_device=context_device,
                      denoiser_device=denoiser_device, compile=compile, threads=threads, cuda_graphs=cuda_graphs)
    if block is None:
        block = rt.cfg.block_size
    elif two and (warning := rt.block_warning("mask_diffusion", block)):
        report_warning(*warning)
    ids = [rt.tokenizer.encode(t, add_special_tokens=not chat) for t in texts]
    if any(not p for p in ids):
        raise TwoTowerError("a prompt encodes to no tokens", "remove empty lines from the prompt file")
    console = err_console()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("benchmarking", total=None)
        rows = run_bench(rt.backend, ids, max_new_tokens=max_new_tokens, block=block, steps=steps, thresholds=thr,
                         repeat=repeat, mask_token_id=rt.cfg.mask_token_id, pad_token_id=int(rt.cfg.pad_token_id or 0),
                         eos_ids=rt.eos_ids, batch_size=batch_size,
                         progress=lambda d, t: bar.update(task, completed=d, total=t))
    dtype = rt.backend.ar.lm_head.weight.dtype
    settings = {"model": str(rt.folder), "prompts": len(texts), "max_new_tokens": max_new_tokens, "block": block,
                "steps": steps or block, "chat": chat, "thresholds": thr, "repeat": repeat, "batch_size": batch_size, "dtype": str(dtype),
                "compile": compile, "cuda_graphs": cuda_graphs, "graph_captures": rt.backend.captures}
    towers = rt.loaded.twotower
    settings["devices"] = {"context": str(rt.backend.device),
                           "denoiser": None if towers is None else str(towers.denoiser_device)}
    m = machine_info(rt.backend.device, dtype)
    where = m["device"]
    if settings["devices"]["denoiser"] not in (None, where):  # one tower per device: say both
        where = f"context {where}, denoiser {settings['devices']['denoiser']}"
    if as_json:
        print(json.dumps({"rows": rows_json(rows), "settings": settings, "machine": m}))
        return
    batched = f" · batches of {batch_size}" if batch_size > 1 else ""
    shape = f" · block {block}" if two else ""  # ar has no block
    table = Table(title=f"twotower bench · {count(len(texts), 'prompt')} × {count(max_new_tokens, 'token')}{shape}{batched} · "
                        f"median of {repeat}", title_justify="left")
    for col in ("mode", "threshold", "tok/s", "NFE", "tok/NFE", "× ar", "quality"):
        table.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r.mode, "" if r.threshold is None else f"{r.threshold:g}", f"{r.tokens_per_second:.1f}",
                      str(r.nfe), f"{r.tokens_per_nfe:.2f}", number(r.speedup_vs_ar, ".2f", "×"),
                      number(r.quality_vs_ar, ".3f"))
    console.print(table)
    if not two:  # the table has the ar row alone: say why, and how to get the others
        console.print(f"[dim]ar only: {escape(folder.name)} is a plain NemotronH checkpoint; the mock_ar and "
                      f"mask_diffusion rows need a TwoTower one: twotower split {escape(shlex.quote(model or str(folder)))}[/]",
                      highlight=False)
    console.print(f"[dim]{where} · {m['processor']} · {m['cpu_count']} cores · torch {m['torch']} "
                  f"{m['torch_threads']} threads · {settings['dtype']}[/]")
    if "gpu" in m:
        graphs = f" · cuda graphs: {rt.backend.captures} captures" if cuda_graphs else ""
        console.print(f"[dim]{escape(m['gpu'])} · kernels: {escape(m['kernels'])} · experts: "
                      f"{escape(m.get('experts', '-'))}{graphs}[/]", highlight=False)
