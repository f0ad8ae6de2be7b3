"""`twotower env`: what this installation runs on, for a bug report or before a long job — versions, GPUs,
which CUDA kernels import (and why not), the Hugging Face cache and which known models it holds. Reads
only: no download, no model load."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from twotower_cli import __version__, hub
from twotower_cli.errors import TwoTowerError

# Distributions worth a version in a report: the run-time dependencies, the optional kernels, the dev oracle.
LIBRARIES = ("numpy", "safetensors", "huggingface-hub", "tokenizers", "typer", "rich",  # run time
             "triton", "mamba-ssm", "causal-conv1d", "transformers")  # cuda extra, its compiler, dev extra


def library_versions() -> dict[str, str | None]:
    """Installed version of each of `LIBRARIES` (None: not installed), from package metadata, imports none."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 1)


def gpus() -> list[dict[str, Any]]:
    """Each CUDA device torch sees: index, name, memory (all, and free now: what the load's memory check
    compares with), compute capability, bf16."""
    import torch

    from twotower_cli.towers import free_bytes

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"device": f"cuda:{i}", "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "free_gib": _gib(free_bytes(torch.device("cuda", i))),
                    "capability": f"{p.major}.{p.minor}", "bf16": p.major >= 8})
    return out


def models() -> dict[str, dict[str, Any]]:
    """Each embedded model and alias: where it is (embedded, or its Hugging Face cache snapshot), or why not
    (not cached: looked up offline, whatever HF_HUB_OFFLINE says)."""
    out: dict[str, dict[str, Any]] = {}
    for name in hub.EMBEDDED:
        try:
            out[name] = {"where": "embedded", "path": str(hub.resolve(name, allow_download=False))}
        except TwoTowerError as e:
            out[name] = {"where": None, "problem": e.message}
    for alias, repo in hub.ALIASES.items():
        try:
            out[alias] = {"where": "cache", "repo": repo, "path": str(hub.resolve(alias, allow_download=False))}
        except TwoTowerError:
            out[alias] = {"where": None, "repo": repo}
    return out


def report() -> dict[str, Any]:
    """Everything `twotower env` prints, as one JSON-ready dict."""
    import torch

    from twotower_cli.ops import kernels
    from twotower_cli.towers import free_bytes

    try:
        kernel_mode = kernels.mode()
    except TwoTowerError as e:  # reported, not raised: this is the command that shows such things
        kernel_mode = f"invalid: {e.message}"
    return {
        "twotower": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # None: a CPU build
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus(),
        "cpu_count": os.cpu_count(),
        "host_free_gib": _gib(free_bytes(torch.device("cpu"))),  # MemAvailable: the CPU load's memory check
        "torch_threads": torch.get_num_threads(),
        "kernels": {"mode": kernel_mode,
                    **{family: {"imports": kernels.available(family), "why_not": kernels.unavailable_reason(family)}
                       for family in kernels.FAMILIES}},
        "libraries": library_versions(),
        "hub": {"cache": str(hub.hub_cache_dir()), "offline": hub.hub_offline(), "endpoint": hub.hub_endpoint()},
        "models": models(),
    }
