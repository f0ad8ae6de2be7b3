"""Options that several commands share (generate, chat), declared once: the same name, help and default
wherever they appear. A command's own options stay in its module."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from twotower_cli.runtime import Runtime
    from twotower_cli.sampler import SamplingConfig

Model = Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint folder, hub id or alias (default: the embedded tiny model).")]
Mode = Annotated[str, typer.Option(help="mask_diffusion | mock_ar | ar")]
Block = Annotated[int | None, typer.Option(help="Tokens per diffusion block (default: the block the checkpoint's denoiser was trained with, else 16).")]
Steps = Annotated[int | None, typer.Option(help="Denoiser steps per block (default: the block size).")]
Threshold = Annotated[float, typer.Option(help="Commit every masked token whose confidence exceeds this (NVIDIA's operating point: 0.8).")]
Policy = Annotated[str, typer.Option(help="Commit policy: threshold | topk | factor.")]
Factor = Annotated[float, typer.Option(help="Fast-dLLM factor for --policy factor.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")]
Temperature = Annotated[float, typer.Option(help="0 is greedy.")]
TopK = Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling mass.")]
Seed = Annotated[int, typer.Option(help="Random seed for sampling, 0 to 2**64 - 1.")]
MaskTokenId = Annotated[int | None, typer.Option(help="Mask token id (default: from the checkpoint, else 3).")]
Stop = Annotated[list[int] | None, typer.Option(help="Extra token id that ends a sequence (repeatable).")]
StopText = Annotated[list[str] | None, typer.Option("--stop-text", help="Text that ends a sequence, which ends before it (repeatable), e.g. --stop-text $'\\n\\n'.")]
Chat = Annotated[bool, typer.Option("--chat", help="Send each prompt as a user message through the checkpoint's chat template (instruct models).")]
System = Annotated[str | None, typer.Option(help="A system message before the first turn (chat templates).")]
ChatArg = Annotated[list[str] | None, typer.Option("--chat-arg", help="A chat-template variable KEY=VALUE, VALUE as JSON, e.g. enable_thinking=false (repeatable).")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if available).")]
ContextDevice = Annotated[str | None, typer.Option(help="Device of the context tower.")]
DenoiserDevice = Annotated[str | None, typer.Option(help="Device of the denoiser tower.")]
Dtype = Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (auto: bf16 on GPU, fp32 on CPU).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the decode and block steps (a warm-up run compiles them first: from seconds to minutes).")]
CudaGraphs = Annotated[bool, typer.Option("--cuda-graphs", help="GPU: replay steps from CUDA graphs (decode steps, block commits, denoiser steps), kept across blocks and, per batch size, for the next prompts.")]
Threads = Annotated[int | None, typer.Option(help="CPU threads for torch (default: one per core; 1 is often faster for tiny models).")]
NoLive = Annotated[bool, typer.Option("--no-live", help="No live view; print the final text only.")]
# train and tokenize: `--data a.txt b.jsonl` (the files after the first are arguments)
MoreData = Annotated[list[Path] | None, typer.Argument(
    metavar="FILE", help="More data files (so that `--data a.txt b.jsonl` works).", show_default=False)]
# train and tokenize name their checkpoint first, or with -m as every other command does.
CheckpointModel = Annotated[str | None, typer.Option("--model", "-m", metavar="CKPT", help="The checkpoint, as "
                                                     "the other commands take it (instead of naming it first).")]


def checkpoint_first(checkpoint: str | None, model: str | None, more_data: list[Path] | None,
                     command: str) -> tuple[str, list[Path]]:
    """The checkpoint of `train`/`tokenize` and the data files given without --data: with `-m CKPT`, a first
    positional argument is a data file too (`tokenize -m CKPT a.txt b.txt`)."""
    from twotower_cli.errors import TwoTowerError

    more = list(more_data or [])
    if model is not None:
        from twotower_cli.hub import ALIASES, EMBEDDED

        named = checkpoint is not None and not Path(checkpoint).expanduser().exists() and checkpoint in {**ALIASES, **EMBEDDED}
        if checkpoint is not None and (checkpoint == model or named or Path(checkpoint).expanduser().is_dir()):
            # `train tiny -m tiny`: the first argument is a data file when -m is given ("data file tiny does not exist")
            raise TwoTowerError(f"two checkpoints given: {checkpoint} and -m {model}",
                                f"give it once, as in `twotower {command} CKPT --data FILE` or with -m CKPT")
        return model, [Path(checkpoint), *more] if checkpoint is not None else more
    if checkpoint is None:
        raise TwoTowerError("no checkpoint given",
                            f"pass it first, as in `twotower {command} CKPT --data FILE -o OUT`, or with -m CKPT")
    first = Path(checkpoint).expanduser()
    # `tokenize corpus.txt -o x.npy`, `tokenize <(zcat corpus.txt.gz) -o x.npy`: data where the checkpoint goes
    if first.exists() and not first.is_dir() and first.suffix.lower() != ".safetensors":
        what, data = ("a data file", checkpoint) if first.is_file() else ("a pipe", "<(…)")
        raise TwoTowerError(f"{checkpoint} is {what}, not a checkpoint",
                            f"name the checkpoint first, as in `twotower {command} CKPT --data {data} -o OUT`, "
                            "or with -m CKPT (e.g. -m tiny)")
    return checkpoint, more


def template_variables(chat: bool, system: str | None, chat_arg: list[str] | None) -> dict:
    """generate and bench's --chat, --system and --chat-arg, checked before the (slow) load: the chat-template
    variables --chat-arg sets."""
    from twotower_cli.errors import TwoTowerError
    from twotower_cli.text import parse_template_args

    if (system is not None or chat_arg) and not chat:
        raise TwoTowerError("--system and --chat-arg shape a chat template", "add --chat")
    variables = parse_template_args(chat_arg or [])
    if "messages" in variables:  # else a TypeError from the template's render, "a bug"
        raise TwoTowerError("--chat-arg cannot set messages: the prompts are the messages", "leave it out")
    return variables


def block_before_load(block: int | None, steps: int | None) -> int:
    """The block size to check the sampling options against before a model is loaded: --block, else (the
    checkpoint's training block is known after the load) one that fits --steps."""
    from twotower_cli.config import DEFAULT_BLOCK_SIZE

    return block if block is not None else max(steps or DEFAULT_BLOCK_SIZE, 1)


def sampling_config(options: dict) -> SamplingConfig:
    """A command's sampling options (its parameters by name: mode, block, steps, threshold, policy, factor,
    max_new_tokens, temperature, top_k, top_p, mask_token_id, stop; and seed) as a `SamplingConfig`, checked as far as
    they can be before a model is loaded; `Runtime.sampling` completes it from the checkpoint (the mask id and
    block size where the options leave them out)."""
    from twotower_cli.errors import check_seed
    from twotower_cli.sampler import SamplingConfig

    o = options
    check_max_new_tokens(o["max_new_tokens"])
    if o.get("seed") is not None:
        check_seed(o["seed"])
    settings = SamplingConfig(mode=o["mode"], block_size=block_before_load(o["block"], o["steps"]),
                              steps=o["steps"], threshold=o["threshold"], policy=o["policy"], factor=o["factor"],
                              max_new_tokens=o["max_new_tokens"],
                              temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"],
                              mask_token_id=3 if o["mask_token_id"] is None else o["mask_token_id"],
                              stop_ids=tuple(o["stop"] or ()))
    settings.validate(vocab_size=None)  # the vocabulary is known after the load
    return settings


def warn_if_filters_unused(settings: SamplingConfig) -> None:
    """generate, chat: a `Warning:` line for --top-k / --top-p at temperature 0, where they change nothing
    (not serve, where they are defaults for requests that may bring a temperature)."""
    if settings.temperature == 0 and (settings.top_k is not None or settings.top_p is not None):
        from twotower_cli.cli import report_warning

        given = " and ".join(o for o, v in (("--top-k", settings.top_k), ("--top-p", settings.top_p)) if v is not None)
        report_warning(f"{given}: no effect at --temperature 0, which decodes greedily",
                       "add --temperature, e.g. --temperature 0.8")


def _click_module(name: str):
    """A module of the click that typer runs on (recent typer carries its own copy, `typer._click`)."""
    import importlib

    from twotower_cli.cli import _click

    return importlib.import_module(f"{_click.__name__}.{name}")


def _context():
    """The running command's click context, or None outside a command."""
    return _click_module("globals").get_current_context(silent=True)


def _command_default(name: str):
    """The default the running command declares for its parameter `name` (None outside a command)."""
    ctx = _context()
    for param in ctx.command.params if ctx is not None else ():
        if param.name == name:
            return param.default
    return None


def check_max_new_tokens(n: int) -> None:
    """-n below 1 is one Error line whose hint is the running command's own default (generate 128, chat 256,
    bench 64), not one number for all of them."""
    from twotower_cli.errors import TwoTowerError

    if n < 1:
        default = _command_default("max_new_tokens")
        raise TwoTowerError(f"max-new-tokens {n} must be at least 1",
                            f"try {default}" if isinstance(default, int) and default >= 1 else "try 128")


def given(*names: str) -> set[str]:
    """Of the running command's parameters `names`, those the user set (on the command line or through an
    environment variable), as opposed to left at their defaults."""
    ctx = _context()
    if ctx is None:
        return set()
    default = _click_module("core").ParameterSource.DEFAULT
    return {n for n in names if ctx.get_parameter_source(n) not in (None, default)}


def warn_if_options_unused(settings: SamplingConfig, passed: set[str], why: str | None = None,
                           requests: bool = False) -> None:
    """generate, chat, bench, serve: one `Warning:` line for each sampling option the user gave (`passed`:
    parameter names, see `given`) that the chosen mode and policy never read: --block, --steps, --threshold,
    --policy and --factor outside mask_diffusion (ar and mock_ar commit one token per step); in mask_diffusion,
    --threshold unless --policy threshold, --factor unless --policy factor. `why`: what the line says instead of
    the mode (bench, which has no --mode). `requests` (serve, with a denoiser loaded): the options are defaults
    that a request may set the mode or policy to use, which the line says."""
    from twotower_cli.cli import report_warning

    flags = {"block": "--block", "steps": "--steps", "threshold": "--threshold", "policy": "--policy",
             "factor": "--factor"}
    if settings.mode != "mask_diffusion":
        for name in [n for n in flags if n in passed]:
            report_warning(f"{flags[name]}: no effect " + (why or f"in --mode {settings.mode}, which commits one "
                                                                   "token per step")
                           + (" (unless a request sets mode mask_diffusion)" if requests else ""),
                           "leave it out" + ("" if why else ", or use --mode mask_diffusion"))
        return
    for name, policy in (("threshold", "threshold"), ("factor", "factor")):
        if name in passed and settings.policy != policy:
            report_warning(f"{flags[name]}: no effect with --policy {settings.policy}"
                           + (f" (unless a request sets policy {policy})" if requests else ""),
                           f"leave it out, or use --policy {policy}")


def warm_up(rt: Runtime, settings: SamplingConfig, prompts: list[list[int]] | None = None, rows: int = 1) -> None:
    """--compile, --cuda-graphs: a short run of `settings` on `prompts` (chat and serve, which have none yet:
    a line of English, `rows` times: serve batches requests) before the real work (`sampler.warm_up`), under a
    status line, then its seconds on stderr. Compiling takes from seconds (the tiny model on a CPU) to minutes;
    without this it passed in silence and was counted in the first tok/s. Nothing without either option."""
    from twotower_cli import sampler as S
    from twotower_cli.display import err_console

    done = [w for w, on in (("compiled", rt.backend.compiled), ("captured CUDA graphs for", rt.backend.graphs)) if on]
    if not done:
        return
    console = err_console()
    with console.status("[dim]warm-up: compiling the steps…[/]" if rt.backend.compiled
                        else "[dim]warm-up: capturing the steps' CUDA graphs…[/]"):
        prompts = prompts or [rt.tokenizer.encode("The first request comes after this one.")] * rows
        seconds = S.warm_up(rt.backend, prompts, settings, rt.eos_ids)
    console.print(f"[dim]warm-up {seconds:.1f} s: {' and '.join(done)} the {settings.mode} steps[/]", highlight=False)
