"""`twotower env`: the installation and the machine, for a bug report or before a long job."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from twotower_cli.cli import app, guarded


@app.command()
@guarded
def env(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Versions, GPUs, which CUDA kernels import (and why not), the Hugging Face cache and the models it holds.

    Reads only: no download, no model load.
    """
    from rich.markup import escape

    from twotower_cli.display import err_console
    from twotower_cli.environment import report
    from twotower_cli.hub import DEFAULT_ENDPOINT

    r = report()
    if as_json:
        print(json.dumps(r, indent=2))
        return
    c = err_console()
    out = c.print

    def line(label: str, text: str) -> None:
        out(f"[bold]{label}[/]: {escape(text)}", highlight=False, soft_wrap=True)

    line("twotower", f"{r['twotower']} · Python {r['python']} · {r['platform']}")
    host = "" if r["host_free_gib"] is None else f" · {r['host_free_gib']} GiB of host memory free"
    line("torch", f"{r['torch']} (CUDA build {r['torch_cuda'] or 'none'}) · {r['cpu_count']} cores, "
                  f"{r['torch_threads']} threads{host}")
    if r["gpus"]:
        for g in r["gpus"]:
            free = "" if g["free_gib"] is None else f" ({g['free_gib']} free)"
            line(g["device"], f"{g['name']} · {g['memory_gib']} GiB{free} · compute {g['capability']} · "
                              f"bf16 {'yes' if g['bf16'] else 'no'}")
    else:
        line("GPUs", "none that torch can use" + (" (a CPU build of torch)" if not r["torch_cuda"] else ""))
    k = r["kernels"]
    families = " · ".join(f"{name} " + ("yes" if v["imports"] else f"no ({v['why_not']})")
                          for name, v in k.items() if name != "mode")
    line("kernels", f"TWOTOWER_KERNELS={k['mode']} · {families}")
    libs = r["libraries"]
    line("libraries", " · ".join(f"{name} {version}" for name, version in libs.items() if version))
    missing = [name for name, version in libs.items() if not version]
    if missing:
        line("not installed", ", ".join(missing))
    h = r["hub"]
    line("hub cache", f"{h['cache']}" + (" (HF_HUB_OFFLINE: no downloads)" if h["offline"] else "")
         + (f" · hub at {h['endpoint']} (HF_ENDPOINT)" if h["endpoint"] != DEFAULT_ENDPOINT else ""))
    have = [f"{name} ({m['where']})" for name, m in r["models"].items() if m["where"]]
    absent = [name for name, m in r["models"].items() if not m["where"]]
    line("models", ", ".join(have) + (f" · not cached: {', '.join(absent)}" if absent else ""))
