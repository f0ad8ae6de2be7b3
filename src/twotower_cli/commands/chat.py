"""`twotower chat`: a multi-turn conversation in the terminal; the context tower keeps its state between turns."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from twotower_cli.cli import app, guarded
from twotower_cli.commands import options as O

HELP = """/reset   forget the conversation (the system message stays)
/help    this list
/exit    quit (or Ctrl-D); Ctrl-C stops a reply, or drops the line being typed
A line ending in \\ continues on the next; a line of \"\"\" opens a block of lines that the next one closes."""


def gather(first: str, read_more: Callable[[], str]) -> str:
    """One message: the line read and, where it asks for more, the lines after it. A line ending in a
    backslash continues on the next (a newline in its place); a line that is just three double quotes
    opens a block of lines that the next such line closes (the end of input closes it too)."""
    if first.strip() == '"""':
        lines = []
        try:
            while (line := read_more()).strip() != '"""':
                lines.append(line)
        except EOFError:
            pass
        return "\n".join(lines)
    text = first
    try:
        while text.endswith("\\"):
            text = text[:-1] + "\n" + read_more()
    except EOFError:
        text = text.removesuffix("\\")
    return text


def _lines(interactive: bool):
    """The user's messages: read with a prompt (and line editing) on a terminal, else from stdin as they
    come; either way joined by `gather`."""
    from twotower_cli.display import err_console
    from twotower_cli.text import read_stdin

    if not interactive:
        def more() -> str:
            line = read_stdin(sys.stdin.readline)
            if not line:
                raise EOFError
            return line.rstrip("\n")

        while line := read_stdin(sys.stdin.readline):
            yield gather(line.rstrip("\n"), more)
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    from twotower_cli.cli import Terminated

    while True:
        try:
            yield gather(err_console().input("[bold green]> [/]"), lambda: err_console().input("[dim]. [/]"))
        except EOFError:
            err_console().print()
            return
        except KeyboardInterrupt as e:  # Ctrl-C drops the line being typed, as a shell or Python's prompt does:
            if isinstance(e, Terminated):  # one pressed just after a reply ended must not end the conversation
                raise
            err_console().print("\n[dim](Ctrl-D or /exit quits)[/]")


@app.command(help="Talk to a model turn by turn; each turn reads only what the context tower has not read yet.\n\n"
             "With a chat template (instruct models) each line is a user message; without one (base models, the "
             "embedded tiny model) the conversation is one running text that each line extends. Commands: "
             "/reset, /help, /exit. Piped in, each line that is not a command is a turn. A line ending in \\ continues on the next; "
             "a line of three double quotes opens a multi-line message that the next one closes.")
@guarded
def chat(
    model: O.Model = None,
    mode: O.Mode = "mask_diffusion",
    block: O.Block = None,
    steps: O.Steps = None,
    threshold: O.Threshold = 0.8,
    policy: O.Policy = "threshold",
    factor: O.Factor = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens per reply at most.")] = 256,
    temperature: O.Temperature = 0.0,
    top_k: O.TopK = None,
    top_p: O.TopP = None,
    seed: O.Seed = 0,
    mask_token_id: O.MaskTokenId = None,
    stop: O.Stop = None,
    stop_text: O.StopText = None,
    system: O.System = None,
    chat_arg: O.ChatArg = None,
    no_template: Annotated[bool, typer.Option("--no-template", help="Ignore the checkpoint's chat template: the conversation is one running text.")] = False,
    device: O.Device = None,
    context_device: O.ContextDevice = None,
    denoiser_device: O.DenoiserDevice = None,
    dtype: O.Dtype = "auto",
    compile: O.Compile = False,
    cuda_graphs: O.CudaGraphs = False,
    threads: O.Threads = None,
    no_live: O.NoLive = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per reply on stdout.")] = False,
) -> None:
    import torch
    from rich.markup import escape

    from twotower_cli import sampler as S
    from twotower_cli.chat import Conversation, PrefixReuse, chat_turn
    from twotower_cli.cli import Terminated, report_error, report_warning
    from twotower_cli.display import err_console, follow, print_text
    from twotower_cli.errors import TwoTowerError
    from twotower_cli.runtime import fetch_model, open_runtime
    from twotower_cli.serve import template_variables_taken
    from twotower_cli.text import ChatTemplate, StopTexts, find_chat_template, parse_template_args

    settings = O.sampling_config(locals())  # option errors before the (slow) load
    stop_texts = StopTexts.check(stop_text)
    O.warn_if_filters_unused(settings)
    O.warn_if_options_unused(settings, O.given("block", "steps", "threshold", "policy", "factor"))
    folder = fetch_model(model, mode != "ar", device, dtype, context_device, denoiser_device)
    template = None if no_template or find_chat_template(folder) is None else ChatTemplate.load(folder)
    if template is None and (system is not None or chat_arg):
        raise TwoTowerError("--system and --chat-arg shape a chat template, and this chat has none",
                            "leave them out, or use a checkpoint with a chat template (without --no-template)")
    variables = parse_template_args(chat_arg or [])
    if taken := template_variables_taken(variables):  # else a TypeError at the first turn, "a bug"
        raise TwoTowerError(f"--chat-arg cannot set {taken}: chat sets it for each turn", "leave it out")
    rt = open_runtime(str(folder), need_denoiser=mode != "ar", device=device, dtype=dtype,
                      context_device=context_device, denoiser_device=denoiser_device, compile=compile, threads=threads,
                      cuda_graphs=cuda_graphs)
    settings = rt.sampling(settings, mask_token_id=mask_token_id, block=block)
    if (warning := rt.block_warning(settings.mode, settings.block_size)) is not None:
        report_warning(*warning)
    O.warm_up(rt, settings)  # --compile, --cuda-graphs: before the first turn
    conversation = Conversation(rt.tokenizer, template, system, variables)
    cutter = StopTexts(stop_texts, rt.tokenizer.decode, S.stop_set(settings, rt.eos_ids), settings.block_size)
    backend = PrefixReuse(rt.backend)
    gen = torch.Generator().manual_seed(seed)
    console = err_console()
    interactive = sys.stdin.isatty()
    live = not no_live and not as_json and console.is_terminal
    how = f"chat template from {template.origin}" if template is not None else "no chat template: one running text"
    if interactive:
        console.print(f"[dim]twotower chat · {escape(rt.folder.name)} · {mode} · {escape(how)} · /help · Ctrl-D quits[/]",
                      highlight=False)  # escaped: a folder named like a tag, "m[bold]", is text
    failed = False
    warned = False  # that the conversation outgrew the stated context: said once
    for line in _lines(interactive):
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/help":
            console.print(HELP, markup=False)
            continue
        if command == "/reset":
            conversation.reset()
            console.print("[dim](conversation reset)[/]")
            continue
        if command.startswith("/") and " " not in command:
            report_error(TwoTowerError(f"unknown command {command}", "/help lists them; a message starting with / "
                                       "needs a space in it"))
            failed = failed or not interactive  # piped in, a line that got no reply fails the run, as a failed turn does
            continue
        try:  # the live view's status line is replaced by the turn's stats line below
            finished = follow(chat_turn(backend, conversation, line, settings, rt.eos_ids, gen, cutter),
                              rt.tokenizer.decode, [""], settings, live, keep_status=False,
                              final=lambda ids: cutter.final(ids)[0])
        except KeyboardInterrupt as e:
            if not interactive or isinstance(e, Terminated):  # SIGTERM ends the chat, not only the reply
                raise
            console.print("[dim](reply stopped; it is not part of the conversation)[/]")
            continue
        except TwoTowerError as e:
            report_error(e)
            failed = True
            continue
        turn = conversation.turns[-1]
        g, wall = turn.generation, finished.wall_seconds
        n = len(turn.reply_ids)
        if not warned and (beyond := rt.beyond_context(turn.prompt_tokens + n + settings.max_new_tokens)):
            warned = True
            report_warning(f"with its next reply this conversation may reach {beyond}", "/reset starts a new conversation")
        if as_json:
            print(json.dumps({
                "turn": len(conversation.turns), "user": line, "text": turn.reply, "token_ids": turn.reply_ids,
                "finish_reason": g.finish_reason, "nfe": g.nfe, "tokens_per_nfe": n / max(g.nfe, 1),
                "tokens_per_second": n / max(wall, 1e-9), "wall_seconds": wall, "prompt_tokens": turn.prompt_tokens,
                "read_tokens": turn.read_tokens, "mode": mode,
                "settings": {**finished.settings, "stop_texts": stop_texts, "seed": seed},
                "model": str(rt.folder)}), flush=True)
            continue
        if not live or not sys.stdout.isatty():
            print_text(turn.reply)
        console.print(f"[dim]{n} tok · NFE {g.nfe} · {n / max(g.nfe, 1):.2f} tok/NFE · {n / max(wall, 1e-9):.1f} tok/s · "
                      f"context {turn.prompt_tokens} tok, {turn.read_tokens} read this turn"
                      + (" · cut at --max-new-tokens" if g.finish_reason == "length" else "")
                      + (" · ended at a --stop-text" if g.finish_reason == "stop" else "") + "[/]", soft_wrap=True)
    if failed:
        raise typer.Exit(1)
