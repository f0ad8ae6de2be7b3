"""Strict, lazy loading of safetensors checkpoints into our modules (design principle 5, spec §1 and §9).

    load_state(module, ckpt, key_map=None, dtype=None, device="cpu", allow_unused=False) -> LoadReport
    load_nemotron_h(path, dtype=None, device="cpu") -> NemotronHForCausalLM (eval mode)

`module` is normally built on the meta device. Every key of its state dict is mapped to a checkpoint key
(`key_map`, identity by default), read shard by shard through `Checkpoint.iter_tensors`, shape-checked,
cast to `dtype` (None keeps the file's dtype) except the `layout.keep_fp32` parameters, which are always
fp32, and assigned with `load_state_dict(strict=True, assign=True)`. Nothing is initialised afterwards.
The per-expert tensors of a layer are read into the rows of one stack, which `moe.Experts` takes as is.
On a GPU that changes nothing (each tensor is read onto the device and copied into its row there). On the
CPU the stacks are copies in process memory, where a load in the file's dtype used to leave the experts
memory-mapped (safetensors' CPU tensors are views of the page cache): the file's per-expert tensors are
not one region, so a stack cannot be a view of them.

Every problem is one TwoTowerError naming the keys: tensors the module needs that the file lacks, shapes
that differ, and checkpoint tensors nobody consumed (unless `layout.is_dropped`, e.g. `mtp.*`, which are
reported in `LoadReport.dropped`, or `allow_unused`, reported in `LoadReport.unused`).

Spellings of the same tensor that we accept, in order (each is reported in `LoadReport.renamed`):
- the key itself;
- `layout.LEGACY_RENAMES` (`backbone.embedding.weight` for `backbone.embeddings.weight`);
- transformers' in-memory layout, written by `save_pretrained(save_original_format=False)`: prefix
  `model.` for `backbone.`, and experts fused per layer as `mixer.experts.up_proj` [E, I, H] /
  `mixer.experts.down_proj` [E, H, I] (sliced back into `experts.{j}.*.weight`).
  The default `save_pretrained` writes the original NVIDIA layout (`backbone.`, one tensor per expert).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from twotower_cli import layout
from twotower_cli.checkpoint import Checkpoint, open_checkpoint
from twotower_cli.config import NemotronHConfig
from twotower_cli.errors import TwoTowerError, count
from twotower_cli.model.moe import Experts
from twotower_cli.model.nemotron_h import NemotronHForCausalLM

_EXPERT = re.compile(r"^(?P<stem>.*\.mixer\.experts)\.(?P<j>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")
_LIST_LIMIT = 20  # names shown per category in an error before "... and N more"


@dataclass
class LoadReport:
    loaded: int = 0  # module tensors filled
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key → the key it was read as
    dropped: list[str] = field(default_factory=list)  # checkpoint keys dropped deliberately (layout.is_dropped)
    unused: list[str] = field(default_factory=list)  # checkpoint keys ignored because allow_unused


@dataclass(frozen=True)
class _Source:
    key: str  # checkpoint tensor
    index: int | None = None  # row of a fused experts tensor


def _spellings(key: str) -> list[tuple[str, int | None]]:
    """Checkpoint keys that may hold `key`, with the expert row to slice for fused tensors."""
    names = [key]
    legacy = {new: old for old, new in layout.LEGACY_RENAMES.items()}
    if key in legacy:
        names.append(legacy[key])
    if key.startswith("backbone."):
        names += ["model." + n[len("backbone."):] for n in list(names)]
    out: list[tuple[str, int | None]] = [(n, None) for n in names]
    for n in names:
        m = _EXPERT.match(n)
        if m:
            out.append((f"{m['stem']}.{m['proj']}", int(m["j"])))
    return out


def _expert_rows(module: nn.Module) -> dict[str, tuple[str, int, int]]:
    """State-dict key of each row of a stacked parameter (`moe.Experts`) → (the parameter, row, rows)."""
    out = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, Experts):
            base = f"{prefix}." if prefix else ""
            for param, keys in sub.rows().items():
                out.update({base + k: (base + param, j, len(keys)) for j, k in enumerate(keys)})
    return out


def _fmt(names: list[str], sep: str = ", ") -> str:
    shown = sep.join(names[:_LIST_LIMIT])
    return shown + (f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else "")


def require_shards(ckpt: Checkpoint) -> None:
    """One TwoTowerError naming the shards the index lists that are not in the folder (a download or a split
    cut short): without it, the tensors they hold read as missing from the model ("does the config match?"),
    or a TwoTower checkpoint whose denoiser shards are gone reads as a plain NemotronH one."""
    gone = ckpt.missing_files
    if not gone:
        return
    what = (f"shard {gone[0]} named in the index is missing" if len(gone) == 1
            else f"{len(gone)} shards named in the index are missing: {_fmt(gone)}")
    raise TwoTowerError(f"checkpoint at {ckpt.folder} is incomplete: {what}",
                        "re-download the checkpoint, or re-run the `twotower split` that wrote it")


def load_state(module: nn.Module, ckpt: Checkpoint, key_map: Callable[[str], str] | None = None,
               dtype: torch.dtype | None = None, device: str | torch.device | Callable[[str], torch.device] = "cpu",
               allow_unused: bool = False, dry_run: bool = False) -> LoadReport:
    """Fill `module` from `ckpt` (see the module docstring). `key_map`: module key → checkpoint key.
    `device` is one device, or a function module key → device (a device map): each tensor is read from the
    file straight onto its own device (safetensors' `safe_open(device=...)`), so two towers on two GPUs never
    pass through host memory together. `dry_run`: the checks only (every tensor there, of its shape, none
    unexpected), from the headers; nothing is read."""
    require_shards(ckpt)
    report = LoadReport()
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    sources: dict[str, _Source] = {}
    missing, wrong = [], []
    for mkey, shape in wanted.items():
        ckey = key_map(mkey) if key_map else mkey
        for name, index in _spellings(ckey):
            info = ckpt.tensors.get(name)
            if info is None or (index is not None and (len(info.shape) != 3 or index >= info.shape[0])):
                continue
            found = info.shape if index is None else info.shape[1:]
            if found != shape:
                wrong.append(f"{name}{'' if index is None else f'[{index}]'} is {list(found)}, expected {list(shape)}")
            sources[mkey] = _Source(name, index)
            if name != ckey:
                report.renamed[name] = ckey
            break
        else:
            missing.append(ckey)

    consumed = {s.key for s in sources.values()}
    unexpected = []
    for name in ckpt.tensors:
        if name in consumed:
            continue
        if layout.is_dropped(name):
            report.dropped.append(name)
        elif allow_unused:
            report.unused.append(name)
        else:
            unexpected.append(name)

    problems = []
    if missing:
        problems.append(f"{count(len(missing), 'tensor')} missing: {_fmt(missing)}")
    if wrong:
        problems.append(f"{count(len(wrong), 'tensor')} with the wrong shape: {_fmt(wrong, '; ')}")
    if unexpected:
        problems.append(f"{count(len(unexpected), 'unexpected tensor')}: {_fmt(unexpected)}")
    if problems:
        depth = layout.layer_count_note(layout.layers_held(wanted), ckpt.tensors)
        hint = f"{depth}: use the config.json they were saved with" if depth else \
            "is the config.json the one these weights were saved with?"
        raise TwoTowerError(f"checkpoint at {ckpt.folder} does not match the model: " + "; ".join(problems), hint)
    if dry_run:
        return report

    # Read each checkpoint tensor once per device that needs it (a fused experts tensor serves every expert
    # of its layer), straight onto that device. A stacked parameter's per-expert tensors are copied into
    # the rows of one tensor as they arrive, so that `Experts` takes it whole: no second copy of the experts.
    place = device if callable(device) else (lambda _key, d=torch.device(device): d)
    by_device: dict[torch.device, dict[str, list[str]]] = {}
    for mkey, src in sources.items():
        by_device.setdefault(torch.device(place(mkey)), {}).setdefault(src.key, []).append(mkey)
    rows = _expert_rows(module)
    stacks: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for dev, by_source in by_device.items():
        for name, tensor in ckpt.iter_tensors(by_source, device=dev):
            for mkey in by_source[name]:
                index = sources[mkey].index
                t = tensor if index is None else tensor[index]
                target = torch.float32 if layout.keep_fp32(mkey) else (dtype or t.dtype)
                if mkey in rows:
                    stack, j, n = rows[mkey]
                    if stack not in stacks:
                        stacks[stack] = torch.empty((n, *t.shape), dtype=target, device=dev)
                    state[mkey] = stacks[stack][j]
                    state[mkey].copy_(t)
                else:
                    state[mkey] = t.to(target, copy=index is not None)  # no views into a fused tensor
            del tensor
    module.load_state_dict(state, strict=True, assign=True)
    report.loaded = len(state)
    return report


def load_nemotron_h(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    router_dtype: torch.dtype = torch.float32) -> NemotronHForCausalLM:
    """A NemotronH causal LM from a checkpoint folder (config.json + safetensors), in eval mode."""
    ckpt = open_checkpoint(path)
    if ckpt.config_raw is None:
        raise TwoTowerError(f"no config.json in {ckpt.folder}", "a checkpoint folder needs config.json beside its weights")
    cfg = NemotronHConfig.from_dict(ckpt.config_raw)
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg, router_dtype)
    load_state(model, ckpt, dtype=dtype, device=device)
    return model.eval()


def cast_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)` for floating tensors, except the spec's fp32 parameters (`layout.keep_fp32`)."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if layout.keep_fp32(name) else dtype)
    return module
