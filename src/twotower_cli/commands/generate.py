"""`twotower generate`: block-diffusion (or mock-AR / AR) sampling with a live view of tokens unmasking."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from twotower_cli.cli import app, guarded, report_warning
from twotower_cli.commands import options as O


def _event_json(ev, decode) -> dict:
    from twotower_cli import sampler as S

    if isinstance(ev, S.BlockStarted):
        return {"event": "block_started", "block": ev.block, "start": ev.start, "size": ev.size, "active": ev.active}
    if isinstance(ev, S.Step):
        return {"event": "step", "block": ev.block, "step": ev.step, "nfe": ev.nfe,
                "positions": ev.committed, "tokens": ev.committed_tokens, "confidences": ev.confidences,
                "text": [[decode([t]) for t in row] for row in ev.committed_tokens]}
    if isinstance(ev, S.BlockDone):
        return {"event": "block_done", "block": ev.block, "tokens": ev.tokens.tolist(), "done": ev.done}
    return {"event": "finished", "nfe": ev.nfe, "wall_seconds": ev.wall_seconds, "new_tokens": ev.new_tokens}


@app.command()
@guarded
def generate(
    prompt: Annotated[str | None, typer.Argument(help="Text to continue; - reads it from stdin, as does no PROMPT with stdin piped (or use --prompt-file).")] = None,
    model: O.Model = None,
    mode: O.Mode = "mask_diffusion",
    block: O.Block = None,
    steps: O.Steps = None,
    threshold: O.Threshold = 0.8,
    policy: O.Policy = "threshold",
    factor: O.Factor = 1.0,
    max_new_tokens: O.MaxNewTokens = 128,
    temperature: O.Temperature = 0.0,
    top_k: O.TopK = None,
    top_p: O.TopP = None,
    seed: O.Seed = 0,
    mask_token_id: O.MaskTokenId = None,
    stop: O.Stop = None,
    stop_text: O.StopText = None,
    prompt_file: Annotated[Path | None, typer.Option(help="One prompt per line, or JSONL with a prompt/text field (with --chat: or a messages list); - reads stdin.")] = None,
    chat: O.Chat = False,
    system: O.System = None,
    chat_arg: O.ChatArg = None,
    device: O.Device = None,
    context_device: O.ContextDevice = None,
    denoiser_device: O.DenoiserDevice = None,
    dtype: O.Dtype = "auto",
    compile: O.Compile = False,
    cuda_graphs: O.CudaGraphs = False,
    threads: O.Threads = None,
    batch_size: Annotated[int, typer.Option(help="Prompts sampled together. Without the live view (--json, --no-live, not a terminal) with continuous batching: a prompt takes the place of one that ended, results in file order as soon as they are done; with it (or --events), in batches of this many.")] = 16,
    no_live: O.NoLive = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt on stdout.")] = False,
    events: Annotated[bool, typer.Option("--events", help="With --json: stream every sampler event as a JSON line.")] = False,
) -> None:
    """Continue a prompt by block diffusion, showing tokens as they unmask."""
    import torch

    from twotower_cli import sampler as S
    from twotower_cli.display import LiveUnmasking, err_console, follow, print_text, stdout_is_terminal
    from twotower_cli.errors import TwoTowerError
    from twotower_cli.runtime import fetch_model, open_runtime, peak_memory_bytes
    from twotower_cli.text import StopTexts, read_prompts, render_chats

    settings = O.sampling_config(locals())  # option errors before the (slow) load
    O.warn_if_filters_unused(settings)
    O.warn_if_options_unused(settings, O.given("block", "steps", "threshold", "policy", "factor"))
    stop_texts = StopTexts.check(stop_text)
    if batch_size < 1:
        raise TwoTowerError(f"batch size {batch_size} must be at least 1", "try --batch-size 16")
    if events and not as_json:
        raise TwoTowerError("--events needs --json", "use --json --events to stream events as JSON lines")
    variables = O.template_variables(chat, system, chat_arg)
    items = read_prompts(prompt, prompt_file, conversations=chat)  # strings; with --chat also conversations
    # what people see of each prompt: its text, or a conversation's last message
    texts = [item if isinstance(item, str) else item[-1]["content"] for item in items]
    model_texts = texts  # what the model reads: the prompts, or their chat-formatted text
    if chat:  # before the (slow) load: a missing or broken template fails fast
        folder = fetch_model(model, mode != "ar", device, dtype, context_device, denoiser_device)
        model = str(folder)
        model_texts = render_chats(folder, items, system, variables)
    rt = open_runtime(model, need_denoiser=mode != "ar", device=device, dtype=dtype,
                      context_device=context_device, denoiser_device=denoiser_device, compile=compile, threads=threads,
                      cuda_graphs=cuda_graphs)
    settings = rt.sampling(settings, mask_token_id=mask_token_id, block=block)
    if (warning := rt.block_warning(settings.mode, settings.block_size)) is not None:
        report_warning(*warning)
    prompts = [rt.tokenizer.encode(t, add_special_tokens=not chat) for t in model_texts]
    if any(not p for p in prompts):
        raise TwoTowerError("a prompt encodes to no tokens", "give some text to continue")
    if (warning := rt.length_warning(max(map(len, prompts)), settings.max_new_tokens)) is not None:
        report_warning(*warning)
    O.warm_up(rt, settings, prompts[:batch_size])  # --compile, --cuda-graphs: not in the timings below
    gen = torch.Generator().manual_seed(seed)
    live = (not no_live and not as_json and err_console().is_terminal)
    decode = rt.tokenizer.decode
    stops = S.stop_set(settings, rt.eos_ids)
    cutter = StopTexts(stop_texts, decode, stops, settings.block_size)
    final_text, until = cutter.final, cutter.until  # the text before the first end id and --stop-text
    nfe = n_new = seq_nfe = 0
    wall = 0.0

    def plain(text: str, out: str) -> None:
        shown = "" if chat else text  # a chat reply is printed alone, as chat tools print it
        print_text(shown + out if len(texts) == 1 else f"{shown}{out}\n")

    def report(item, text, model_text, g: S.Generation, seconds: float, record: dict, drawn: bool = False) -> None:
        """Print one result; `drawn`: the live view's last frame on the terminal already shows it."""
        out, cut = final_text(g.token_ids)
        # the tokens the text before a stop text is made of (the one it begins in is not)
        ids = cutter.ids_before(g.token_ids, out) if cut else g.token_ids
        if as_json:
            print(json.dumps({
                "prompt": item, **({"chat_prompt": model_text} if chat else {}), "text": out,
                "token_ids": ids, "finish_reason": g.finish_reason, "prompt_tokens": len(g.prompt_ids),
                "nfe": g.nfe, "tokens_per_nfe": len(ids) / max(g.nfe, 1),
                "tokens_per_second": len(ids) / max(seconds, 1e-9), "wall_seconds": seconds, "mode": mode,
                "settings": {**record, "stop_texts": stop_texts, "seed": seed}, "model": str(rt.folder),
            }), flush=True)
        elif not drawn:
            plain(text, out)

    continuous = len(prompts) > 1 and not live and not events
    if continuous:  # sequences that end make room for the next prompts at once; results still in file order
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from twotower_cli.batching import Continuous, run_in_order

        record = S.settings_record(settings, stops)
        t0 = time.perf_counter()
        running = Continuous(rt.backend, settings, rt.eos_ids, gen, until)
        results = run_in_order(running, prompts, width=batch_size)
        # a progress bar on a terminal while the results go elsewhere (--json > out.jsonl)
        shown = not no_live and err_console().is_terminal and not stdout_is_terminal()
        try:
            with Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err_console(),
                          transient=True, disable=not shown, redirect_stdout=False,
                          redirect_stderr=False) as bar:  # the results stay on stdout
                task = bar.add_task("prompts", total=len(prompts), rate="")
                for i, g, seconds in results:
                    report(items[i], texts[i], model_texts[i], g, seconds, record)
                    n_new, seq_nfe = n_new + len(g.token_ids), seq_nfe + g.nfe
                    rate = f"{n_new / max(time.perf_counter() - t0, 1e-9):.1f} tok/s"
                    bar.update(task, completed=i + 1, rate=rate)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the prompts under way, in file order, with the text so far
            for i, g, seconds in results.unfinished():  # (--json: finish_reason "interrupted")
                report(items[i], texts[i], model_texts[i], g, seconds, record)
            raise
        wall, nfe = time.perf_counter() - t0, running.nfe
    for first in range(0, 0 if continuous else len(prompts), batch_size):  # each batch printed when it ends
        batch = slice(first, first + batch_size)
        stream = S.generate(rt.backend, prompts[batch], settings, rt.eos_ids, gen, until)

        so_far: list[list[int]] = [[] for _ in prompts[batch]]  # each sequence's committed ids
        nfe_so_far, t_batch = [0], time.perf_counter()

        def seen(ev, index=first // batch_size, so_far=so_far, nfe_so_far=nfe_so_far):
            if isinstance(ev, S.Step):
                nfe_so_far[0] = ev.nfe
            if isinstance(ev, S.BlockDone):
                for ids, row in zip(so_far, ev.tokens.tolist(), strict=True):
                    ids.extend(row)
            if events:  # --events: every event as a JSON line, tagged with its batch
                print(json.dumps({**_event_json(ev, decode), "batch": index}), flush=True)

        try:
            finished = follow(stream, decode, texts[batch], settings, live, on_event=seen,
                              final=lambda ids: final_text(ids)[0])
        except KeyboardInterrupt:  # Ctrl-C: the text so far, where the live view does not show it on the screen
            if not as_json:
                for row, (text, ids) in enumerate(zip(texts[batch], so_far, strict=True)):
                    if not (live and stdout_is_terminal() and row < LiveUnmasking.MAX_ROWS):
                        plain(text, final_text(ids)[0])
            elif len(prompts) == 1 and not events and so_far[0]:
                # --json, one prompt: its record so far, finish_reason "interrupted", as several prompts give
                # theirs (a batch of one: the batch's forwards are its own; --events has said it all already)
                ids = so_far[0][:S.first_stop(so_far[0], stops)]
                g = S.Generation(prompts[0], ids, "interrupted", nfe_so_far[0])
                report(items[0], texts[0], model_texts[0], g, time.perf_counter() - t_batch,
                       S.settings_record(settings, stops))
            raise
        for row, (item, text, model_text, g) in enumerate(zip(items[batch], texts[batch], model_texts[batch],
                                                              finished.generations, strict=True)):
            # the live view draws the first rows of a batch; the others are printed, not lost
            drawn = live and stdout_is_terminal() and row < LiveUnmasking.MAX_ROWS
            report(item, text, model_text, g, finished.wall_seconds, finished.settings, drawn)
        nfe, n_new, wall = nfe + finished.nfe, n_new + finished.new_tokens, wall + finished.wall_seconds
        seq_nfe += sum(g.nfe for g in finished.generations)
    n_prompt = sum(len(p) for p in prompts)
    peak = peak_memory_bytes(rt.backend.device) / 2**20
    kernel_note = ""
    if rt.backend.device.type == "cuda":
        from twotower_cli.ops import kernels

        kernel_note = f" · kernels {kernels.summary()}"
    batches = -(-len(prompts) // batch_size)
    err_console().print(
        f"[dim]prompt {n_prompt} tok · generated {n_new} tok · NFE {nfe}"
        + (f" in {batches} batches" if batches > 1 and not continuous else "")
        # several sequences share each forward: NFE counts forwards, tok/NFE is each sequence's own (its tokens
        # over the forwards it took part in), the measure of the diffusion and the same as one prompt alone gets
        + (f" ({seq_nfe} over the sequences)" if seq_nfe != nfe else "")
        + (f" · continuous batching, ≤ {batch_size} at a time" if continuous else "")
        + f" · {n_new / max(seq_nfe, 1):.2f} tok/NFE{' a sequence' if seq_nfe != nfe else ''} · "
        f"{n_new / max(wall, 1e-9):.1f} tok/s · "
        f"{wall:.2f} s · peak {peak:.0f} MiB{kernel_note}[/]", soft_wrap=True)  # one line in a log, too
