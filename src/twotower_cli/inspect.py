"""Header-only summary and integrity check of a NemotronH or TwoTower checkpoint.

`inspect_checkpoint(path)` reads the safetensors headers, the index, config.json (and the training.json
`twotower train` writes beside its weights, if any), and never tensor
data, with one documented exception: for a TwoTower checkpoint it reads the bytes of `t_block.1.*` and
`scale_shift_tables.*` (at most `TIME_READ_LIMIT` bytes, 43 MB for the 30B model) to tell an identity time
conditioning (as a fresh split leaves it: t_block.1 all zero, every table rows (0, 0, 1)) from a trained
one; above the limit, or when those tensors are absent or unreadable, the state is "unknown". Those bytes
are read with plain `pread`, never `safe_open`.

`inspect_checkpoint(path, values=True)` (`inspect --values`) also reads every tensor's bytes, in bounded
memory, and counts the NaN and Inf values of each floating-point tensor (`scan_values`): any is a problem.

`inspect_remote(repo_id)` does the same for a repository on the Hugging Face hub that is not in the cache,
from its headers read over the network (`twotower_cli.remote`); there the time conditioning is "unknown".

It returns a `Report`: layout ("nemotron_h", "twotower" or "unknown"), sizes, parameters per tower and
per layer kind, active parameters per token, dtypes, bytes, shards, and `problems` — one line per
integrity fault (index vs shards, truncated files, missing/unexpected/wrong-shape tensors). `to_json`
gives the `--json` object and `render` draws the human view with rich. A checkpoint is sound when
`problems` is empty (`"sound"` in the JSON); the CLI exits 1 otherwise.

Active parameters per token (one tower): every parameter except the routed experts a token does not use,
i.e. total - sum over MoE layers of routed_expert_params * (n_routed - top_k) / n_routed; shared
experts always count. For a TwoTower checkpoint it is context tower + denoiser tower + time
conditioning, each touched once per token per forward of both towers.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twotower_cli.checkpoint import (
    DTYPE_BYTES,
    FLOAT_BITS,
    INDEX_NAME,
    Checkpoint,
    TensorInfo,
    index_problems,
    nonfinite_counts,
    open_checkpoint,
)
from twotower_cli.config import LAYER_KINDS, NemotronHConfig
from twotower_cli.errors import TwoTowerError, count
from twotower_cli.layout import layer_count_note, nemotron_h_shapes, time_conditioning_shapes, twotower_shapes
from twotower_cli.split import problem_count, shape_problems, source_view, undroppable

TIME_READ_LIMIT = 256 * 1024 * 1024
KIND_KEYS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
TOWER_PREFIXES = {"context_tower": "context_tower.", "denoiser_tower": "denoiser_tower."}
TIME_PREFIXES = ("t_embedder.", "t_block.", "scale_shift_tables.")
_LAYER = re.compile(r"^(?:backbone|context_tower|denoiser_tower)\.layers\.(\d+)\.")
_ROUTED = re.compile(r"\.layers\.(\d+)\.mixer\.experts\.\d+\.")


@dataclass
class Report:
    path: str
    layout: str
    architecture: str
    source: str | None
    pattern: str
    num_layers: int
    hidden_size: int | None
    vocab_size: int | None
    attention: dict[str, int]  # heads, kv_heads, head_dim
    experts: dict[str, int]  # routed, per_token, shared
    parameters: dict[str, int]
    parameters_by_kind: dict[str, int]  # one tower
    active_parameters_per_token: int
    tensors: int
    bytes: int
    bytes_per_part: dict[str, int]
    dtypes: dict[str, int]
    shards: list[dict[str, Any]]
    problems: list[str]
    notes: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)
    twotower: dict[str, Any] | None = None
    text: dict[str, Any] = field(default_factory=dict)  # tokenizer present, chat template file, end token ids
    tensor_list: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] | None = None  # training.json of a `twotower train` output
    remote: dict[str, Any] | None = None  # read from the hub: repo_id, revision, requests, bytes_read
    values: dict[str, Any] | None = None  # `scan_values`' result, when asked for

    def to_json(self, with_tensors: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path, "sound": not self.problems, "layout": self.layout, "architecture": self.architecture, "source": self.source,
            "pattern": self.pattern, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size, "attention": self.attention, "experts": self.experts,
            "parameters": self.parameters, "parameters_by_kind": self.parameters_by_kind,
            "active_parameters_per_token": self.active_parameters_per_token, "tensors": self.tensors,
            "bytes": self.bytes, "bytes_per_part": self.bytes_per_part, "dtypes": self.dtypes,
            "shards": self.shards, "problems": self.problems, "notes": self.notes,
            "unrecognised_keys": self.unrecognised, "twotower": self.twotower, "text": self.text,
            "training": self.training, "remote": self.remote, "values": self.values,
        }
        if with_tensors:
            out["tensor_list"] = self.tensor_list
        return out


def detect_layout(names: list[str] | set[str]) -> str:
    if any(n.startswith(("context_tower.", "denoiser_tower.")) for n in names):
        return "twotower"
    if any(n.startswith(("backbone.", "model.layers.", "model.embeddings.")) for n in names):
        return "nemotron_h"
    return "unknown"


def _prefixes(names: list[str], limit: int = 8) -> list[str]:
    """Group key names by their first two components: 'transformer.h.* (120 tensors)'."""
    counts = Counter(".".join(n.split(".")[:2]) + ("." if n.count(".") > 1 else "") for n in names)
    lines = [f"{p}* ({c} tensor{'s' if c > 1 else ''})" if p.endswith(".") else f"{p} (1 tensor)"
             for p, c in counts.most_common(limit)]
    if len(counts) > limit:
        lines.append(f"... and {len(counts) - limit} more name groups")
    return lines


def inspect_checkpoint(path: str | Path, file_sizes: dict[str, int] | None = None, values: bool = False,
                       on_bytes: Callable[[int, int], None] | None = None) -> Report:
    """Summarise and check the checkpoint at `path` (a folder or a .safetensors file). `file_sizes`: the true
    size of each shard where the folder holds only their headers (`inspect_remote`). `values`: also read
    every tensor and count its NaN and Inf values (`scan_values`, `on_bytes` its progress)."""
    ckpt = open_checkpoint(path, strict=False, file_sizes=file_sizes)
    problems = index_problems(ckpt)
    notes: list[str] = []
    if Path(path).is_file() and (ckpt.folder / INDEX_NAME).is_file():
        notes.append(f"{Path(path).name} is one shard of the checkpoint in {ckpt.folder} (it has {INDEX_NAME}): "
                     "the tensors of the other shards show as missing; inspect the folder for the whole checkpoint")
    cfg: NemotronHConfig | None = None
    if ckpt.config_raw is None:
        if "config.json" not in ckpt.unreadable:  # (an unreadable one is among index_problems)
            problems.append(f"no config.json in {ckpt.folder}: tensor shapes cannot be checked")
    else:
        try:
            cfg = NemotronHConfig.from_dict(ckpt.config_raw)
        except TwoTowerError as e:
            problems.append(e.message if e.message.startswith("config.json") else f"config.json: {e.message}")
    names = list(ckpt.tensors)
    layout = detect_layout(names)
    unrecognised: list[str] = []
    # Names the index places somewhere: if absent, index_problems already said so; don't say it twice.
    said = set(ckpt.index or {})

    # Canonical shapes (name → shape) by part, and the shape checks.
    towers: dict[str, dict[str, TensorInfo]] = {}
    if layout == "twotower":
        if cfg is not None:
            expected = twotower_shapes(cfg)
            have = {n: t.shape for n, t in ckpt.tensors.items()}
            problems += shape_problems(have, {k: v for k, v in expected.items() if k not in said})
            extra = [n for n in names if n not in expected]
            problems += [f"unexpected tensor {n} (not part of the TwoTower layout)" for n in extra[:10]]
            if len(extra) > 10:
                problems.append(f"... and {len(extra) - 10} more unexpected tensors")
        towers = {
            "context_tower": {n: t for n, t in ckpt.tensors.items()
                              if n.startswith("context_tower.") or n == "context_lm_head.weight"},
            "denoiser_tower": {n: t for n, t in ckpt.tensors.items()
                               if n.startswith("denoiser_tower.") or n == "lm_head.weight"},
            "time_conditioning": {n: t for n, t in ckpt.tensors.items() if n.startswith(TIME_PREFIXES)},
        }
        counts = {n: t.numel for n, t in ckpt.tensors.items()}
    elif layout == "nemotron_h" and cfg is not None:
        try:
            view = source_view(ckpt, cfg)
        except TwoTowerError as e:
            problems.append(e.message)
            view = None
        if view is not None:
            expected = nemotron_h_shapes(cfg)
            missing_ok = said | {f"backbone.{n[len('model.'):]}" for n in said if n.startswith("model.")}
            problems += shape_problems(view.tensors, {k: v for k, v in expected.items() if k not in missing_ok})
            inside = undroppable(view.unexpected)  # as split judges them: the others it drops
            problems += [f"unexpected tensor {n} (the config does not explain it)" for n in inside[:10]]
            if len(inside) > 10:
                problems.append(f"... and {len(inside) - 10} more unexpected tensors")
            if outside := sorted(set(view.unexpected) - set(inside)):
                notes.append(f"{count(len(outside), 'tensor')} outside the model the config describes "
                             f"(e.g. {outside[0]}); split drops them")
            notes += view.transforms
            if view.dropped:
                notes.append(f"{len(view.dropped)} tensors the model does not use (e.g. {view.dropped[0]}); "
                             "split drops them")
            counts = {n: t.numel for n, t in view.tensors.items()}
        else:
            counts = {n: t.numel for n, t in ckpt.tensors.items()}
    else:
        counts = {n: t.numel for n, t in ckpt.tensors.items()}
        if not names:
            problems.append("no tensors could be read from it")
        elif layout == "unknown":
            unrecognised = _prefixes(names)
            problems.append("tensor names match neither the NemotronH nor the TwoTower layout: "
                            + ", ".join(unrecognised[:3]))

    total = sum(t.numel for t in ckpt.tensors.values())
    parameters: dict[str, int] = {"total": total}
    bytes_per_part: dict[str, int] = {}
    if layout == "twotower":
        for part, members in towers.items():
            parameters[part] = sum(t.numel for t in members.values())
            bytes_per_part[part] = sum(t.nbytes for t in members.values())
    else:
        bytes_per_part["tower"] = ckpt.total_bytes

    pattern = cfg.pattern if cfg else ""
    if cfg is not None and (depth := layer_count_note(len(cfg.pattern), names)):
        notes.append(depth)
    tower_prefix = "context_tower." if layout == "twotower" else "backbone."
    by_kind = _by_kind(counts, pattern, tower_prefix)
    active = _active(counts, cfg, tower_prefix) if cfg else total
    if layout == "twotower" and cfg:
        active = active + _active(counts, cfg, "denoiser_tower.") + parameters["time_conditioning"]

    twotower = None
    if layout == "twotower":
        attn = cfg.layer_indices("*") if cfg else []
        twotower = {
            "cross_attention": [{"denoiser_layer": i, "context_layer": i} for i in attn],
            "denoiser_attention": "bidirectional within the block, over the context tower's K,V of the same layer "
                                  "plus the block's own",
            "time_conditioning": time_conditioning_state(ckpt, cfg),
            "mask_token_id": (cfg.twotower.get("mask_token_id") if cfg else None),
            "block_size": (cfg.twotower.get("block_size") if cfg else None),
        }
    text = text_files(ckpt.folder, cfg.eos_token_ids if cfg else [], problems, notes, cfg.vocab_size if cfg else None,
                      read_tokenizer=file_sizes is None)
    training = training_record(ckpt.folder, notes)
    shards = []
    for file in ckpt.files:
        shard = ckpt.shards.get(file)
        if shard is None:
            status = "missing" if file in ckpt.missing_files else "unreadable"
        else:
            ends = [t.data_offsets[1] for t in shard.tensors.values()]
            status = "truncated" if ends and max(ends) > shard.file_size - shard.header_size else "ok"
        size = shard.file_size if shard else 0
        if shard is None and file not in ckpt.missing_files:
            try:
                size = file_sizes[file] if file_sizes is not None else ckpt.path(file).stat().st_size
            except (OSError, KeyError):
                pass
        shards.append({"file": file, "tensors": len(shard.tensors) if shard else 0, "bytes": size, "status": status})
    scanned = None
    if values:
        scanned = scan_values(ckpt, on_bytes)
        problems += nonfinite_problems(scanned, ckpt)
    raw = ckpt.config_raw if isinstance(ckpt.config_raw, dict) else {}
    arch = raw.get("architectures") or []
    arch = ", ".join(map(str, arch if isinstance(arch, list) else [arch])) or "?"
    return Report(
        path=str(path), layout=layout, architecture=arch,
        source=(cfg.twotower.get("source") if cfg else None) or None,
        pattern=pattern, num_layers=len(pattern),
        hidden_size=cfg.hidden_size if cfg else None, vocab_size=cfg.vocab_size if cfg else None,
        attention={"heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                   "head_dim": cfg.attention_head_dim} if cfg and "*" in pattern else {},
        experts={"routed": cfg.n_routed_experts, "per_token": cfg.num_experts_per_tok,
                 "shared": cfg.n_shared_experts} if cfg and "E" in pattern else {},
        parameters=parameters, parameters_by_kind=by_kind, active_parameters_per_token=active,
        tensors=len(ckpt.tensors), bytes=ckpt.total_bytes, bytes_per_part=bytes_per_part,
        dtypes=dict(sorted(Counter(t.dtype for t in ckpt.tensors.values()).items())),
        shards=shards, problems=problems, notes=notes, unrecognised=unrecognised, twotower=twotower, text=text,
        training=training, values=scanned,
        tensor_list=[{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "file": t.file}
                     for t in sorted(ckpt.tensors.values(), key=lambda t: (t.file, t.data_offsets[0]))],
    )


def inspect_remote(repo_id: str, endpoint: str | None = None, as_path: bool = False) -> Report:
    """`inspect_checkpoint` of a hub repository (`owner/name`, `@revision` after it or not) from its headers,
    read over the network (`remote`); nothing is downloaded into the cache. The time conditioning's bytes are
    not read: its state is "unknown"."""
    from twotower_cli.remote import header_folder

    with header_folder(repo_id, endpoint=endpoint, as_path=as_path) as (folder, got):
        report = inspect_checkpoint(folder, file_sizes=got.file_sizes)
    # Its lines name files by their path: the repository's, not the temporary folder's.
    report.problems = [p.replace(str(folder), got.repo_id) for p in report.problems]
    report.notes = [n.replace(str(folder), got.repo_id) for n in report.notes]
    report.path = f"{got.repo_id}@{got.revision[:12]}"
    report.remote = {"repo_id": got.repo_id, "revision": got.revision, "requests": got.requests,
                     "bytes_read": got.bytes_read}
    report.notes.insert(0, f"read from the Hugging Face hub: headers and text files only ({_bytes(got.bytes_read)} "
                           f"in {count(got.requests, 'request')}); nothing was downloaded into the cache")
    return report


def training_record(folder: Path, notes: list[str]) -> dict[str, Any] | None:
    """`twotower train`'s training.json beside the weights (its step, settings and losses), if there is one."""
    path = folder / "training.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise ValueError("not a training record")
    except (ValueError, OSError) as e:
        notes.append(f"training.json cannot be read ({e}): the training record is not shown")
        return None
    return record


def text_files(folder: Path, config_eos: list[int], problems: list[str], notes: list[str],
               vocab_size: int | None = None, read_tokenizer: bool = True) -> dict[str, Any]:
    """What generation reads beside the weights: whether tokenizer.json is there, its size if it reads as a
    tokenizer (`tokens`; None where `read_tokenizer` is off: a remote inspect holds only its name), which file
    holds the chat template (None: no template; `generate --chat` needs one) and the ids that end a sequence.
    An unreadable tokenizer, generation or chat-template file is a problem (generate would refuse the
    checkpoint); a missing tokenizer a note (the weights are sound without it), and so is one with more tokens
    than the model's vocabulary (text holding those would not run)."""
    from twotower_cli.text import Tokenizer, end_token_ids, find_chat_template, generation_eos_ids

    out: dict[str, Any] = {"tokenizer": (folder / "tokenizer.json").is_file(), "tokens": None,
                           "tokenizer_error": None, "chat_template": None, "eos_token_ids": list(config_eos)}
    if not out["tokenizer"]:
        notes.append("no tokenizer.json: generate and train need the source model's tokenizer files beside it")
    elif read_tokenizer:
        try:  # it said ✓ for any file of that name: generate then failed on it
            out["tokens"] = Tokenizer(folder).vocab_size
        except TwoTowerError as e:
            out["tokenizer_error"] = e.message
            problems.append(e.message)
        if vocab_size is not None and (out["tokens"] or 0) > vocab_size:
            notes.append(f"tokenizer.json has {out['tokens']:,} tokens, more than the model's {vocab_size:,} "
                         "(vocab_size): text holding the last ones cannot run; the tokenizer may be another model's")
    try:
        found = find_chat_template(folder)
        out["chat_template"] = found[1].name if found else None
    except TwoTowerError as e:
        problems.append(e.message)
    try:
        out["eos_token_ids"] = end_token_ids(list(config_eos), generation_eos_ids(folder))
    except TwoTowerError as e:
        problems.append(e.message)
    return out


def _by_kind(counts: dict[str, int], pattern: str, prefix: str) -> dict[str, int]:
    """Parameters of one tower by layer kind, plus embeddings, final norm and head."""
    out = {KIND_KEYS[k]: 0 for k in LAYER_KINDS if k in pattern}
    out.update({"embeddings": 0, "norm_f": 0, "lm_head": 0})
    head = "context_lm_head.weight" if prefix == "context_tower." else "lm_head.weight"
    for name, n in counts.items():
        if not name.startswith(prefix) and name != head:
            continue
        m = _LAYER.match(name)
        if m and int(m.group(1)) < len(pattern):
            out[KIND_KEYS[pattern[int(m.group(1))]]] += n
        elif name == head:
            out["lm_head"] += n
        elif "embedding" in name:
            out["embeddings"] += n
        elif name.endswith("norm_f.weight"):
            out["norm_f"] += n
    return out


def _active(counts: dict[str, int], cfg: NemotronHConfig, prefix: str) -> int:
    """Parameters one token touches in one tower (see the module docstring)."""
    head = "context_lm_head.weight" if prefix == "context_tower." else "lm_head.weight"
    tower = {n: c for n, c in counts.items() if n.startswith(prefix) or n == head}
    routed: Counter[int] = Counter()
    for name, c in tower.items():
        m = _ROUTED.search(name)
        if m:
            routed[int(m.group(1))] += c
    idle = sum(r * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
               for r in routed.values()) if cfg.n_routed_experts else 0
    return sum(tower.values()) - idle


def time_conditioning_state(ckpt: Checkpoint, cfg: NemotronHConfig | None) -> str:
    """'identity' (t_block.1.* zero, tables rows (0, 0, 1)), 'trained', or 'unknown' (see module docstring)."""
    if cfg is None:
        return "unknown"
    names = ["t_block.1.weight", "t_block.1.bias"] + [f"scale_shift_tables.{i}" for i in range(cfg.num_hidden_layers)]
    infos = [ckpt.tensors.get(n) for n in names]
    shapes = time_conditioning_shapes(cfg)
    if any(t is None or t.shape != shapes[t.name] or t.dtype not in _ONE for t in infos):
        return "unknown"
    if sum(t.nbytes for t in infos if t) > TIME_READ_LIMIT:
        return "unknown"
    fds: dict[str, int] = {}
    try:
        for t in infos:
            assert t is not None
            if t.file not in fds:
                fds[t.file] = os.open(ckpt.path(t.file), os.O_RDONLY)
            if t.name.startswith("t_block."):
                expected_chunks = ((n, bytes(n)) for n in _chunk_sizes(t.nbytes))
            else:  # rows shift, scale = 0 and gate = 1
                width = t.shape[1] * DTYPE_BYTES[t.dtype]
                expected_chunks = iter([(t.nbytes, bytes(2 * width) + _ONE[t.dtype] * t.shape[1])])
            offset = t.file_range[0]
            for n, want in expected_chunks:
                got = os.pread(fds[t.file], n, offset)
                if len(got) < n:  # the file ends first (truncated): these bytes tell nothing
                    return "unknown"
                if got != want:
                    return "trained"
                offset += n
        return "identity"
    except OSError:
        return "unknown"
    finally:
        for fd in fds.values():
            os.close(fd)


_ONE = {"F32": b"\x00\x00\x80\x3f", "F16": b"\x00\x3c", "BF16": b"\x80\x3f", "F64": b"\x00" * 6 + b"\xf0\x3f"}


def _chunk_sizes(total: int, chunk: int = 8 * 1024 * 1024) -> list[int]:
    return [min(chunk, total - o) for o in range(0, total, chunk)]


_SCAN_CHUNK = 16 * 1024 * 1024


def scan_values(ckpt: Checkpoint, on_bytes: Callable[[int, int], None] | None = None,
                workers: int | None = None) -> dict[str, Any]:
    """Read every floating-point tensor of `ckpt` (plain `pread`s of 16 MB, file order) and count its NaN and
    Inf values from the bits alone (no torch, nothing converted). Returns {"tensors": checked, "bytes": read,
    "not_float": names of the other tensors, "unread": names whose bytes the file does not hold (truncated
    or missing: a problem already), "nonfinite": {name: {"nan": n, "inf": n}} for the tensors with any}.
    Shards are read in parallel by `workers` threads (default: one per core, at most 8; reads and numpy's
    work release the GIL), each shard by one. `on_bytes(n, total)` is called as bytes are read (from those
    threads): n read now, of `total` to read."""
    from concurrent.futures import ThreadPoolExecutor

    result: dict[str, Any] = {"tensors": 0, "bytes": 0, "not_float": [], "unread": [], "nonfinite": {}}
    by_file: dict[str, list[TensorInfo]] = {}
    for t in ckpt.tensors.values():
        if t.dtype not in FLOAT_BITS:
            result["not_float"].append(t.name)
        else:
            by_file.setdefault(t.file, []).append(t)
    total = sum(t.nbytes for infos in by_file.values() for t in infos)
    read = None if on_bytes is None else (lambda n: on_bytes(n, total))
    workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(by_file)))
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda item: _scan_file(ckpt.path(item[0]), item[1], read), by_file.items()))
    for part in parts:  # in the files' order, whichever thread finished first
        result["tensors"] += part["tensors"]
        result["bytes"] += part["bytes"]
        result["unread"] += part["unread"]
        result["nonfinite"].update(part["nonfinite"])
    return result


def _scan_file(path: Path, infos: list[TensorInfo], on_bytes: Callable[[int], None] | None) -> dict[str, Any]:
    """`scan_values` of one shard's tensors."""
    part: dict[str, Any] = {"tensors": 0, "bytes": 0, "unread": [], "nonfinite": {}}
    infos = sorted(infos, key=lambda t: t.data_offsets[0])
    done = 0
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for t in infos:
                nan, inf, read = _scan_tensor(fd, t, on_bytes)
                part["bytes"] += read
                if nan or inf:
                    part["nonfinite"][t.name] = {"nan": nan, "inf": inf}
                if read < t.nbytes:  # the file ends inside this tensor (or before it)
                    part["unread"].append(t.name)
                else:
                    part["tensors"] += 1
                done += 1
        finally:
            os.close(fd)
    except OSError:  # the file cannot be opened, or a read fails: what is left of it is not read
        part["unread"] += [t.name for t in infos[done:]]
    return part


def _scan_tensor(fd: int, t: TensorInfo, on_bytes: Callable[[int], None] | None) -> tuple[int, int, int]:
    """NaN count, Inf count and bytes read of one tensor (fewer than its size where the file ends first)."""
    step = _SCAN_CHUNK - _SCAN_CHUNK % DTYPE_BYTES[t.dtype]
    nan = inf = read = 0
    start, end = t.file_range
    for offset in range(start, end, step):
        want = min(step, end - offset)
        data = os.pread(fd, want, offset)
        read += len(data)
        if on_bytes is not None:
            on_bytes(len(data))
        n, i = nonfinite_counts(data, t.dtype)
        nan, inf = nan + n, inf + i
        if len(data) < want:
            break
    return nan, inf, read


def nonfinite_problems(scanned: dict[str, Any], ckpt: Checkpoint, limit: int = 10) -> list[str]:
    """One problem line per tensor holding NaN or Inf (at most `limit`, then a count)."""
    bad = sorted(scanned["nonfinite"].items())
    lines = [f"{name} holds {c['nan']:,} NaN and {c['inf']:,} Inf values (of {ckpt.tensors[name].numel:,})"
             for name, c in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more tensors holding NaN or Inf values")
    return lines


# ============================================================================================ rendering

KIND_STYLE = {"M": ("green", "Mamba-2"), "*": ("magenta", "attention"), "E": ("blue", "MoE"), "-": ("yellow", "MLP")}


def _num(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def pattern_text(pattern: str) -> Any:
    """The layer pattern as coloured blocks, with a legend line of counts."""
    from rich.text import Text

    text = Text()
    for ch in pattern:
        text.append("█", style=KIND_STYLE[ch][0])
    text.append("\n")
    counts = Counter(pattern)
    for ch, (style, label) in KIND_STYLE.items():
        if counts[ch]:
            text.append("█", style=style)
            text.append(f" {ch} {label} ×{counts[ch]}   ")
    return text


def render(report: Report, console: Any, tensors: bool = False) -> None:
    """The human view of a report, on a rich console (stderr in the CLI). Text from the checkpoint (paths,
    file and tensor names, problems) is escaped: a folder `ckpt[v2]` must not print as `ckpt`."""
    from rich.markup import escape
    from rich.table import Table

    title = {"nemotron_h": "NemotronH single tower", "twotower": "TwoTower (context tower + denoiser)",
             "unknown": "unknown layout"}[report.layout]
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("checkpoint", escape(report.path))
    info.add_row("layout", title)
    info.add_row("architecture", escape(report.architecture))
    if report.source:
        info.add_row("source", escape(str(report.source)))
    if report.hidden_size:
        info.add_row("hidden / vocab", f"{report.hidden_size} / {report.vocab_size}")
    if report.attention:
        a = report.attention
        info.add_row("attention", f"{a['heads']} heads, {a['kv_heads']} kv heads, head dim {a['head_dim']}")
    if report.experts:
        e = report.experts
        info.add_row("experts", f"{e['routed']} routed (top {e['per_token']}) + {e['shared']} shared")
    info.add_row("parameters", " · ".join(f"{k.replace('_', ' ')} {_num(v)}" for k, v in report.parameters.items()))
    info.add_row("active / token", _num(report.active_parameters_per_token))
    info.add_row("tensors / bytes", f"{report.tensors:,} / {_bytes(report.bytes)}")
    info.add_row("dtypes", ", ".join(f"{k} ×{v}" for k, v in report.dtypes.items()))
    if len(report.bytes_per_part) > 1:
        info.add_row("bytes per tower", " · ".join(f"{k.replace('_', ' ')} {_bytes(v)}"
                                                   for k, v in report.bytes_per_part.items()))
    console.print(info)
    if report.pattern:
        console.print(f"\n[bold]layers[/] ({report.num_layers})")
        console.print(pattern_text(report.pattern))
        kinds = Table(title="parameters per layer kind" + (" (each tower)" if report.layout == "twotower" else ""),
                      title_justify="left")
        kinds.add_column("kind")
        kinds.add_column("parameters", justify="right")
        for k, v in report.parameters_by_kind.items():
            kinds.add_row(k, f"{v:,}")
        console.print(kinds)
    if report.twotower:
        t = report.twotower
        pairs = ", ".join(f"{p['denoiser_layer']}↔{p['context_layer']}" for p in t["cross_attention"]) or "none"
        console.print(f"[bold]cross attention[/] (denoiser layer ↔ context-tower layer, layer-aligned): {pairs}")
        console.print(f"[bold]denoiser attention[/]: {t['denoiser_attention']}")
        state = t["time_conditioning"]
        desc = {"identity": "identity (as a fresh split leaves it: the denoiser computes the base model)",
                "trained": "trained (differs from the identity)", "unknown": "unknown (not read)"}[state]
        console.print(f"[bold]time conditioning[/]: {desc}")
        console.print(f"[bold]mask token id[/]: {t['mask_token_id'] if t['mask_token_id'] is not None else 'not recorded (readers use 3)'}"
                      f"   [bold]block size[/]: {t['block_size'] if t['block_size'] is not None else 'not recorded'}")
    if report.training:
        r, st, h = report.training, report.training["settings"], report.training.get("history", {})
        world = st.get("world_size", 1)
        how = ("FSDP" if st.get("fsdp") else "DDP") + f" × {world}" if world > 1 or st.get("fsdp") else "1 process"

        def loss(x: Any) -> str:
            return f"{x:.4f}" if isinstance(x, (int, float)) else "-"

        console.print(f"[bold]training[/]: step {r.get('step')} of {st.get('steps')} · eval loss "
                      f"{loss(h.get('eval_loss_before'))} → {loss(h.get('eval_loss_after'))} · block {st.get('block')}, "
                      f"{st.get('batch')} × {st.get('seq_len')} tokens, lr {st.get('lr')}, {st.get('train')}, "
                      f"t per {st.get('noise_per', 'block')} · {how}"
                      + (f" · {count(h['skipped_steps'], 'step')} skipped (not finite)" if h.get("skipped_steps") else ""),
                      highlight=False)
    if report.text:
        t = report.text
        state = ("unreadable" if t.get("tokenizer_error") else f"✓ ({t['tokens']:,} tokens)" if t.get("tokens")
                 else "✓" if t["tokenizer"] else "missing")
        console.print(f"[bold]text[/]: tokenizer.json {state} · chat template "
                      f"{escape(t['chat_template'] or 'none')} · ends on {', '.join(map(str, t['eos_token_ids'])) or 'nothing'}",
                      highlight=False)
    shards = Table(title="shards", title_justify="left")
    for col in ("file", "tensors", "bytes", "status"):
        shards.add_column(col, justify="right" if col in ("tensors", "bytes") else "left")
    for s in report.shards:
        shards.add_row(escape(s["file"]), str(s["tensors"]), _bytes(s["bytes"]), s["status"])
    console.print(shards)
    if tensors:  # plain lines, not a table: full names at any width, easy to grep
        console.print(f"[bold]tensors[/] ({len(report.tensor_list):,})")
        width = max((len(t["name"]) for t in report.tensor_list), default=0)
        for t in report.tensor_list:
            console.print(f"  {t['name']:<{width}}  {t['dtype']:<5} {str(t['shape']):<16} {t['file']}",
                          soft_wrap=True, markup=False)
    if report.values is not None:
        v = report.values
        bad = len(v["nonfinite"])
        verdict = (f"[red]{count(bad, 'tensor')} holding NaN or Inf[/]" if bad else
                   "all finite" + (f", [red]{count(len(v['unread']), 'tensor')} not read (the file ends first)[/]"
                                   if v["unread"] else ""))
        skipped = f" ({count(len(v['not_float']), 'integer tensor')} not checked)" if v["not_float"] else ""
        console.print(f"[bold]values[/]: {v['tensors']:,} tensors, {_bytes(v['bytes'])} read{skipped}: {verdict}",
                      highlight=False)
    for note in report.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    if report.problems:
        console.print(f"[bold red]✗ not sound: {count(problem_count(report.problems), 'problem')}:[/]")
        for p in report.problems:
            console.print(f"  [red]✗[/] {escape(p)}", soft_wrap=True)
    else:
        console.print("[bold green]✓ sound: no problems found[/]")

