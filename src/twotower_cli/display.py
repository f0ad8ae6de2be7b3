"""The one place that talks to the terminal: rich consoles for people (stderr) and data (stdout)."""

from __future__ import annotations

import functools
import math
from typing import Any

from rich.console import Console


@functools.cache
def err_console() -> Console:
    """Everything meant for people: progress, tables, live views, errors."""
    return Console(stderr=True, highlight=False)


@functools.cache
def out_console() -> Console:
    """Data that scripts read (`inspect --json`). Generated text goes through `print_text` instead."""
    return Console(highlight=False, soft_wrap=True, emoji=False)


def print_text(text: str) -> None:
    """Generated text (and a newline) on stdout as it is: rich would expand its tabs, drop its carriage
    returns and turn `:smile:` into an emoji."""
    import sys

    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def finite_json(v: Any) -> Any:
    """`v` (dicts and lists of them, any depth) with every NaN or infinite float as None: JSON has neither,
    and `json.dumps` would write `NaN`, which strict parsers (jq, JavaScript) refuse. For numbers that can be
    unmeasured: a loss of a run that diverged, the likelihood of a mode that wrote no tokens."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite_json(x) for k, x in v.items()}
    return [finite_json(x) for x in v] if isinstance(v, list | tuple) else v


def number(x: float, spec: str, unit: str = "") -> str:
    """`x` for people, formatted by `spec` (then `unit`), or "-" where it is NaN or infinite: a number that
    could not be measured (`finite_json`'s null)."""
    return f"{x:{spec}}{unit}" if math.isfinite(x) else "-"


def stdout_is_terminal() -> bool:
    """Whether the results go to the screen the live view draws on (then its last frame is the result)."""
    import sys

    return sys.stdout.isatty()


def byte_progress(console: Console, label: str, **kw):
    """A transient progress bar of bytes (done / total, speed, time left) on `console`, labelled `label`
    (rich markup; "{task.description}" lets a command change it per phase): split's copy, inspect --values."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, transient=True, **kw)


# ---------------------------------------------------------------------------------------------- live unmasking

class LiveUnmasking:
    """Draws the sampler's events: prompt, committed text, the current block with masked slots as dim
    placeholders and this step's commits highlighted, block i/n, step s/steps and NFE (ar, mock_ar: token i/n). Redraws are
    throttled (at most `fps` per second) and done by rich `Live` on stderr, so frames never tear."""

    MASK_GLYPH = "░"
    MAX_ROWS = 4  # sequences drawn; the others are counted in a "(+n more prompts)" line

    def __init__(self, decode, prompts: list[str], n_blocks: int, steps: int, mode: str, mask_id: int,
                 fps: float = 20.0, max_rows: int = MAX_ROWS, keep_status: bool = True, final=None):
        from rich.live import Live

        self.decode = decode
        self.final = final or decode  # generated ids → the text the command prints (`Finished`)
        self.texts: list[str] | None = None  # each row's final text, once `Finished` came
        self.prompts = prompts[:max_rows]
        self.hidden_rows = max(0, len(prompts) - max_rows)
        self.rows = len(self.prompts)
        self.n_blocks, self.steps, self.mode, self.mask_id = n_blocks, steps, mode, mask_id
        self.min_interval = 1.0 / fps
        self.status = True  # the block / step / NFE line; `keep_status=False` drops it from the last frame
        self.keep_status = keep_status
        self.committed: list[list[int]] = [[] for _ in range(self.rows)]
        self.block = None
        self.fresh: list[set[int]] = [set() for _ in range(self.rows)]
        self.active = [True] * self.rows
        self.block_index = self.step = self.nfe = 0
        self.block_steps = steps
        self._last = 0.0
        self.live = Live(console=err_console(), auto_refresh=False, transient=False, redirect_stdout=False,
                         redirect_stderr=False)

    def __enter__(self) -> LiveUnmasking:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.status = self.keep_status
        self.live.update(self.render(whole=True))  # drawn by the exit, which lets it run past the screen
        self.live.__exit__(*exc)

    def handle(self, event) -> None:
        import time

        from twotower_cli import sampler as S

        if isinstance(event, S.BlockStarted):
            self.block_index, self.step = event.block, 0
            self.block_steps = min(self.steps, event.size)  # a short last block takes fewer steps
            self.block = None
            self.fresh = [set() for _ in range(self.rows)]
            self.active = event.active[: self.rows]  # a sequence that has ended shows no more blocks
        elif isinstance(event, S.Step):
            self.block = event.tokens[: self.rows].tolist()
            self.fresh = [set(p) for p in event.committed[: self.rows]]
            self.step, self.nfe = event.step + 1, event.nfe
        elif isinstance(event, S.BlockDone):
            for r in range(self.rows):  # a block that settled at a stop id keeps masked slots after it
                self.committed[r].extend(t for t in event.tokens[r].tolist() if t != self.mask_id)
            self.block = None
        elif isinstance(event, S.Finished):  # the text as --no-live prints it: cut at its end id (or stop text)
            self.texts = [self.final(list(g.token_ids)) for g in event.generations[: self.rows]]
        now = time.perf_counter()
        if now - self._last >= self.min_interval:
            self._last = now
            self.live.update(self.render(), refresh=True)

    def render(self, whole: bool = False):
        """A frame, cut to the terminal's height (`_Fit`) unless `whole` (the last frame: all the text)."""
        from rich.console import Group
        from rich.text import Text

        parts = []
        for r in range(self.rows):
            t = Text()
            t.append(self.prompts[r], style="dim cyan")
            t.append(self.texts[r] if self.texts is not None else self.decode(self.committed[r]))
            if self.block is not None and self.active[r]:
                for j, tok in enumerate(self.block[r]):
                    if tok == self.mask_id:
                        t.append(self.MASK_GLYPH, style="dim")
                    else:
                        t.append(self.decode([tok]), style="bold black on green" if j in self.fresh[r] else "green")
            parts.append(t)
            parts.append(Text(""))
        if self.hidden_rows:
            parts.append(Text(f"(+{self.hidden_rows} more prompts)", style="dim"))
        unit = "block" if self.mode == "mask_diffusion" else "token"  # ar and mock_ar: a "block" of one token
        status = Text(f"{self.mode}  {unit} {min(self.block_index + 1, self.n_blocks)}/{self.n_blocks}"
                      + (f"  step {self.step}/{self.block_steps}" if self.mode == "mask_diffusion" else "")
                      + f"  NFE {self.nfe}", style="bold blue")
        if self.status:
            parts.append(status)
        return Group(*parts) if whole else _Fit(parts[: 2 * self.rows: 2], parts[2 * self.rows:])


class _Fit:
    """The live view's rows of text (each then a blank line) and the lines under them, cut to the console's
    height: a row taller than its share keeps its last lines, where its block unmasks, under a dim "…" line.
    (rich's Live cuts a frame taller than the terminal at the bottom, and with it the block and status line.)"""

    def __init__(self, rows: list, footer: list):
        self.rows, self.footer = rows, footer

    def __rich_console__(self, console, options):
        from rich.segment import Segment
        from rich.style import Style

        below = sum(len(console.render_lines(part, options, pad=False)) for part in self.footer)  # wrapped lines
        share = max(1, (options.size.height - below) // max(len(self.rows), 1) - 1)
        for row in self.rows:
            lines = console.render_lines(row, options, pad=False)
            if len(lines) > share:
                lines = lines[-1:] if share == 1 else [[Segment("…", Style(dim=True))], *lines[1 - share:]]
            for line in lines:
                yield from line
                yield Segment.line()
            yield Segment.line()
        yield from self.footer


def follow(stream, decode, prompts: list[str], settings, live: bool, keep_status: bool = True, on_event=None,
           final=None):
    """Drain a sampler's events: drawn by a `LiveUnmasking` (sized from the sampling settings) when `live`,
    and handed to `on_event` if given. Returns the `Finished` event. `final`: generated ids → the text the
    last frame shows (default: decoded)."""
    from twotower_cli import sampler as S

    finished = None
    if live:
        per_step = settings.mode == "mask_diffusion"
        n_blocks = -(-settings.max_new_tokens // (settings.block_size if per_step else 1))
        with LiveUnmasking(decode, prompts, n_blocks, settings.steps_per_block if per_step else 1, settings.mode,
                           settings.mask_token_id, keep_status=keep_status, final=final) as view:
            for ev in stream:
                view.handle(ev)
                if on_event is not None:
                    on_event(ev)
                finished = ev if isinstance(ev, S.Finished) else finished
    else:
        for ev in stream:
            if on_event is not None:
                on_event(ev)
            finished = ev if isinstance(ev, S.Finished) else finished
    assert finished is not None, "a sampler stream ends with Finished"
    return finished
