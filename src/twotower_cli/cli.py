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
from collections.abc import Callable, Iterator
from typing import Any

import click
import typer

from twotower_cli import __version__
from twotower_cli.errors import TwoTowerError

app = typer.Typer(
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

    if isinstance(e, TwoTowerError):
        msg, hint = e.message, e.hint
    elif isinstance(e, KeyboardInterrupt):
        msg, hint = "interrupted", None
    elif isinstance(e, MemoryError):
        msg, hint = "out of memory", "try a smaller --dtype, fewer tokens or another device"
    elif isinstance(e, OSError):
        msg, hint = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else ""), \
            "check paths, permissions and free disk space"
    else:
        msg, hint = f"{type(e).__name__}: {e}", "this looks like a bug; rerun with TWOTOWER_DEBUG=1 and report it"
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
    TWOTOWER_DEBUG=1). Typer's own usage errors keep their exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _term_as_interrupt():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException):
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
    stops its model's thread; by default SIGTERM ends the process at once and leaves partial output behind."""
    def stop(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (tests that call commands from threads): signals left alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def get_app() -> typer.Typer:
    """The typer app with every command registered (tests use this with typer's CliRunner)."""
    from twotower_cli import commands  # noqa: F401  (registers the commands on `app`)

    return app


def main() -> None:
    """Console-script entry point."""
    get_app()(prog_name="twotower")
