"""The one place that talks to the terminal: rich consoles for people (stderr) and data (stdout)."""

from __future__ import annotations

import functools

from rich.console import Console


@functools.cache
def err_console() -> Console:
    """Everything meant for people: progress, tables, live views, errors."""
    return Console(stderr=True, highlight=False)


@functools.cache
def out_console() -> Console:
    """Data that scripts read (`--json`), plain text results."""
    return Console(highlight=False, soft_wrap=True)
