"""Thin typer commands: parse, call one library function, render.

Every `TwoTowerError` becomes one `Error: …` line (plus its hint) on stderr and exit code 1; any other
exception does too, unless TWOTOWER_DEBUG=1 asks for the traceback. Output meant for scripts (`--json`)
goes to stdout, everything for people to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer
import typer.core
from typer.core import TyperGroup

from twotower_cli import __version__
from twotower_cli.errors import TwoTowerError, describe, lone_surrogate_at

# The click typer runs on: recent typer carries its own copy (`typer._click`, whose exceptions are not the click
# package's), older typer uses click itself.
_click = getattr(typer.core, "_click", None) or typer.core.click
_NoArgsIsHelp = getattr(_click.exceptions, "NoArgsIsHelpError", ())  # click < 8.2 prints the help and exits 0


class _Commands(TyperGroup):
    """The command group, whose command line errors (an unknown option, a value that does not parse, a
    missing or extra argument) are bad input like any other: one `Error: …` line with a hint and exit code 1,
    where typer draws a usage line and a boxed message and exits with 2. `twotower` alone still prints the
    help (exit code 2, as click does)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            # not standalone: click exceptions come out; typer.Exit's code is returned, and a command that
            # ends normally returns None (`guarded` returns nothing)
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as e:  # the help is printed already
            sys.exit(e.exit_code)
        except _click.exceptions.ClickException as e:
            ctx = getattr(e, "ctx", None)
            if isinstance(e, _click.exceptions.NoSuchOption) and ctx is not None:
                e.possibilities = completions(e.option_name, ctx) or e.possibilities
            path = ctx.command_path if ctx is not None else self._path(args, prog_name)
            report_error(TwoTowerError(e.format_message(), f"{path} -h lists its arguments and options"))
            sys.exit(1)
        except typer.Abort:
            report_error(KeyboardInterrupt())
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def get_command(self, ctx, name: str):  # noqa: ANN001
        """The command, its help's paragraphs flowed (`flowed`) however typer renders them, and its flags shown
        without a value (`valueless_flags`)."""
        command = super().get_command(ctx, name)
        if command is not None:
            if command.help:
                command.help = flowed(command.help)
            check_raw_values(valueless_flags(command.get_params(ctx), ctx))
        return command

    def get_params(self, ctx):  # noqa: ANN001
        return valueless_flags(super().get_params(ctx), ctx)  # `twotower -h`: --version and --help

    def _path(self, args, prog_name) -> str:  # noqa: ANN001
        """`twotower COMMAND` for an error that names no context (an option missing its value)."""
        prog = prog_name or "twotower"
        name = next((a for a in (sys.argv[1:] if args is None else args) if not a.startswith("-")), None)
        return f"{prog} {name}" if name in self.commands else prog


def completions(name: str, ctx) -> list[str]:  # noqa: ANN001
    """The command's long options that begin with `name` (`--temp` → --temperature): click suggests by edit
    distance alone, which offered --steps, --stop and --system for --temp."""
    if not name.startswith("--") or len(name) < 4:
        return []
    names = {o for p in ctx.command.get_params(ctx) for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
    return sorted(o for o in names if o.startswith(name) and o != name)


def valueless_flags(params: list, ctx=None) -> list:  # noqa: ANN001
    """`params`, each flag (--json, --chat, --help: an option that takes no value) given an empty metavar: typer
    0.29's help showed `<bool>` beside every flag, which reads as an option that wants true or false
    (`--chat true` is then an extra argument). Older typer showed nothing there, as it now does again. A
    repeatable option shows the value it takes each time (`--stop <int>`, not `<list[int]>`, which reads as
    one option taking a list: `--stop 1,2`)."""
    for param in params:
        if param.metavar is not None or getattr(param, "param_type_name", "") != "option":
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.multiple and ctx is not None and hasattr(param, "display_type"):
            shown = param.display_type(ctx)
            if shown.startswith("<list[") and shown.endswith("]>"):
                param.metavar = "<" + shown[len("<list["):-len("]>")] + ">"
    return params


# Options and arguments that name a file or folder (a path may be any bytes), and those that name something
# else that an empty value cannot name (a checkpoint, a device, an address).
PATHS = frozenset({"model", "checkpoint", "source", "prompts", "prompt_file", "data", "more_data", "eval_data",
                   "out", "out_arg", "output", "log"})
NAMES_SOMETHING = PATHS | {"host", "context_device", "denoiser_device"}


def check_raw_values(params: list) -> list:
    """`params`, each of those in NAMES_SOMETHING refusing an empty value: `-m "$MODEL"` with MODEL unset ran the
    embedded tiny model, `--data ""` read the current folder, `--context-device ""` put the tower on the default
    device and `serve --host ""` listened on every interface, each without a word. And each text value that is
    not a path refusing bytes that are not UTF-8 (Python reads them from argv as lone surrogates, which the
    tokenizer refused with a bare TypeError: `--system $'\xff'`, `--stop-text`, `--chat-arg`; the prompt says
    so itself). The raw values are checked before typer converts them (a Path of "" is ".")."""
    for param in params:
        if getattr(param, "_raw_checked", False):
            continue
        convert = param.process_value

        def checked(ctx, value, param=param, convert=convert):  # noqa: ANN001, ANN202
            values = value if isinstance(value, list | tuple) else [value]
            if param.name in NAMES_SOMETHING and "" in values:
                raise _click.exceptions.BadParameter(
                    "an empty value names nothing (an unset shell variable?)", ctx=ctx, param=param)
            if param.name not in PATHS and param.name != "prompt":
                for v in values:
                    if isinstance(v, str) and lone_surrogate_at(v) is not None:
                        raise _click.exceptions.BadParameter("not UTF-8 text", ctx=ctx, param=param)
            return convert(ctx, value)

        param.process_value, param._raw_checked = checked, True
    return params



def flowed(help_text: str) -> str:
    """A command's help (its docstring) with each paragraph on one line, for the terminal to wrap: typer
    0.29 keeps a docstring's line breaks, which broke `eval -h`'s text mid-sentence at every width (on 80
    columns: a line of a few words after each); older typer joined them itself. Paragraphs (blank-line
    separated) and click's `\b` (no rewrap) blocks stay as they are."""
    import inspect

    return "\n\n".join(p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
                       for p in inspect.cleandoc(help_text).split("\n\n"))


app = typer.Typer(
    cls=_Commands,
    name="twotower",
    help="Block-diffusion language models from pretrained NemotronH checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"twotower {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Block-diffusion language models from pretrained NemotronH checkpoints."""


def report_error(e: BaseException) -> None:
    from twotower_cli.display import err_console

    msg, hint = (" ".join(str(part).split("\n")) if part else part for part in describe(e))  # one line, always
    line = f"[bold red]Error:[/] {_escape(msg)}"
    if hint:
        line += f" [dim](hint: {_escape(hint)})[/]"
    err_console().print(line, soft_wrap=True, highlight=False)


def report_warning(message: str, hint: str | None = None) -> None:
    """One `Warning: …` line on stderr: the command goes on."""
    from twotower_cli.display import err_console

    line = f"[bold yellow]Warning:[/] {_escape(message)}"
    if hint:
        line += f" [dim](hint: {_escape(hint)})[/]"
    err_console().print(line, soft_wrap=True, highlight=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so that errors become one `Error: …` line and exit code 1 (traceback only with
    TWOTOWER_DEBUG=1). Command line errors typer finds are reported the same way (`_Commands`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _term_as_interrupt():
                fn(*args, **kwargs)  # nothing returned: the exit code is 0 (`_Commands.main`)
        except (typer.Exit, typer.Abort, _click.exceptions.ClickException):
            raise
        except BrokenPipeError:  # the reader left (`| head`): click ends quietly with exit code 1, as rich does
            raise
        except BaseException as e:  # noqa: BLE001 — the one place errors turn into an exit code
            if isinstance(e, SystemExit):
                raise
            if os.environ.get("TWOTOWER_DEBUG") == "1":
                raise
            report_error(e)
            raise typer.Exit(1) from None

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt (`_term_as_interrupt`): what cleans up on Ctrl-C cleans up
    on it too, but where Ctrl-C only stops the work in hand (chat's reply on a terminal), it ends the command."""


@contextlib.contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a batch scheduler, a container stopping) ends a command as Ctrl-C does: a
    KeyboardInterrupt in the main thread, so that what it writes is cleaned up (split's and tokenize's
    temporary folders), train says which step its output holds, and serve answers its open requests and
    stops its model's thread; by default SIGTERM ends the process at once and leaves partial output behind.

    Once one has arrived, later ones are ignored: `timeout` (and a process group's `kill`) delivers two in quick
    succession, and the second cut the first one's cleanup short (serve: "Error: interrupted" after "stopped",
    or killed by the signal, 143), or, once the default was back, killed the process on its way out. The real
    command line (`main`) keeps ignoring them until it exits; a command run in-process (tests) gets the
    previous handler back."""
    received = []

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the next one must not interrupt the cleanup
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (tests that call commands from threads): signals left alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if received and _EXITS_AFTER else previous)


def get_app() -> typer.Typer:
    """The typer app with every command registered (tests use this with typer's CliRunner)."""
    from twotower_cli import commands  # noqa: F401  (registers the commands on `app`)

    return app


_EXITS_AFTER = False  # set by `main`: the process ends with the command (its signal handling may stay changed)


def main() -> None:
    """Console-script entry point."""
    global _EXITS_AFTER
    _EXITS_AFTER = True
    get_app()(prog_name="twotower")
