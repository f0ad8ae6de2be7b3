"""NemotronH single-tower checkpoint → TwoTower checkpoint (spec §1 → §3): a pure plan, then streaming.

`source_view(ckpt, cfg)` sees the source in the canonical single-tower layout, whatever naming the
writer used: transformers' in-memory names (`model.*` → `backbone.*`), the legacy
`backbone.embedding.weight`, and fused expert stacks (`experts.up_proj` [E, I, H] → `experts.{j}.up_proj.weight`
[I, H], a byte slice of the stack). Every such transform is named and reported; keys the model does not
use (`mtp.*`, ...) are dropped and listed.

`plan_split(...)` is pure: it maps every source tensor to its two destinations (`context_tower.*` and
`denoiser_tower.*`, `lm_head` to both heads), adds the time conditioning, checks coverage and shapes
against the config, and lays out the output shards byte for byte (headers included), so `--dry-run`
shows exactly what would be written.

`execute(plan, out)` streams. With dtype "keep" a tensor is a byte range copied from the source file
to the output file by `os.copy_file_range` (falling back to `sendfile`, then to buffered reads), so
nothing is decoded. `--dtype` conversions go chunk by chunk through numpy. torch is never imported.
Time-conditioning tensors come from small generated buffers: `t_block.1.*` zeros and every
`scale_shift_tables.i` rows (shift 0, scale 0, gate 1) make the denoiser start as the base model
(spec §3); `t_embedder` gets a seeded small normal init (std 0.02, biases 0). Memory stays bounded by
the chunk size whatever the model size. Output goes to a temporary folder renamed at the end
(`checkpoint.atomic_output_dir`), so an interruption leaves nothing behind; the source is only read.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twotower_cli.checkpoint import (
    DTYPE_BYTES,
    INDEX_NAME,
    TORCH_DTYPE_NAMES,
    Checkpoint,
    atomic_output_dir,
    check_output_folder,
    encode_header,
    index_problems,
    nonfinite_counts,
    open_checkpoint,
    parse_size,
    shard_names,
    write_index,
)
from twotower_cli.config import TWOTOWER_ARCHITECTURE, NemotronHConfig
from twotower_cli.errors import TwoTowerError, count
from twotower_cli.layout import (
    LEGACY_RENAMES,
    is_dropped,
    keep_fp32,
    layer_count_note,
    nemotron_h_shapes,
    time_conditioning_shapes,
)

FORMAT_VERSION = 1
SPLIT_WORKERS = 2  # output shards written at once (see execute)
CHUNK_BYTES = 256 * 1024 * 1024  # one in-kernel copy step (no user-space buffer): sets progress granularity
RUN_SHARD_MIN = 16 * 1024 * 1024  # shards at least this big end where a source run ends (see _group_shards)
BUFFER_BYTES = 16 * 1024 * 1024  # bytes through Python at once (convert, generate, verify): bounds memory
INIT_STD = 0.02  # t_embedder weights (DiT's init); biases start at 0
INIT_SEED = 0
DTYPE_CHOICES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

MODEL_NAMESPACE = ("backbone.", "model.", "lm_head.")  # source keys that are part of the model's computation

_FUSED_EXPERTS = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)(?:\.weight)?$")


# ============================================================================================ source view

@dataclass(frozen=True)
class SourceTensor:
    """A tensor of the canonical single-tower layout: a byte range [start, end) of a source file."""

    name: str  # canonical key, e.g. backbone.layers.3.mixer.experts.7.up_proj.weight
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int
    origin: str  # the key in the source file (differs when renamed or unfused)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SourceView:
    tensors: dict[str, SourceTensor]  # canonical name → bytes, in source (file, offset) order
    transforms: list[str]  # named transforms applied, e.g. "renamed model.* → backbone.* (412 tensors)"
    dropped: list[str]  # source keys deliberately left out (mtp.*, rotary buffers)
    unexpected: list[str]  # source keys the config does not explain (also left out)


def source_view(ckpt: Checkpoint, cfg: NemotronHConfig) -> SourceView:
    """The source's tensors under canonical NemotronH names (see the module docstring)."""
    expected = nemotron_h_shapes(cfg)
    out: dict[str, SourceTensor] = {}
    renamed = legacy = unfused = 0
    dropped, unexpected = [], []

    def put(t: SourceTensor) -> None:
        if t.name in out:  # e.g. backbone.embedding.weight beside backbone.embeddings.weight: which one is meant?
            raise TwoTowerError(f"{out[t.name].origin} and {t.origin} are both {t.name}",
                                "remove one of the two from the checkpoint")
        out[t.name] = t

    for info in sorted(ckpt.tensors.values(), key=lambda t: (t.file, t.data_offsets[0])):
        name = info.name
        if is_dropped(name):
            dropped.append(name)
            continue
        if name.startswith("model."):  # transformers' module names (save_original_format=False)
            name = "backbone." + name[len("model."):]
            renamed += 1
        if name in LEGACY_RENAMES:
            name = LEGACY_RENAMES[name]
            legacy += 1
        start, end = info.file_range
        fused = _FUSED_EXPERTS.match(name)
        if fused and len(info.shape) == 3:
            n_experts, per_shape = info.shape[0], info.shape[1:]
            want = expected.get(f"{fused.group(1)}.0.{fused.group(2)}.weight")
            if want is None:  # no MoE layer there in the config: its slices would be tensors of no layer
                unexpected.append(info.name)
                continue
            if (n_experts, *per_shape) != (cfg.n_routed_experts, *want):
                raise TwoTowerError(f"{info.name} has shape {list(info.shape)}: cannot unfuse it into "
                                    f"{cfg.n_routed_experts} experts of shape {list(want)}",
                                    "only [experts, out, in] stacks (as transformers writes them) are supported")
            step = (end - start) // max(n_experts, 1)
            for j in range(n_experts):
                key = f"{fused.group(1)}.{j}.{fused.group(2)}.weight"
                put(SourceTensor(key, info.dtype, tuple(per_shape), info.file,
                                 start + j * step, start + (j + 1) * step, info.name))
            unfused += 1
            continue
        if name not in expected:
            unexpected.append(info.name)
            continue
        put(SourceTensor(name, info.dtype, info.shape, info.file, start, end, info.name))
    transforms = []
    if renamed:
        transforms.append(f"renamed model.* → backbone.* ({renamed} tensors, transformers' module names)")
    if legacy:
        transforms.append(f"renamed {', '.join(LEGACY_RENAMES)} to the current name")
    if unfused:
        transforms.append(f"unfused {unfused} stacked expert tensors into per-expert tensors (byte slices)")
    return SourceView(out, transforms, dropped, unexpected)


def undroppable(unexpected: list[str]) -> list[str]:
    """The source keys the config does not explain that a split cannot drop: a tensor of the model's own (a
    bias the config says is absent, a layer past the pattern) would leave the split computing something else
    than the source. Keys outside the model (`MODEL_NAMESPACE`) are dropped and reported. (lm_head.weight is
    unexpected only beside tied embeddings, where the head is the embedding, as in transformers.)"""
    return [n for n in unexpected if n.startswith(MODEL_NAMESPACE) and n != "lm_head.weight"]


_MORE = re.compile(r"^\.\.\. and (\d+) more ")


def problem_count(problems: list[str]) -> int:
    """The problems a list holds, each "... and N more ..." line (`shape_problems`) counted as the N it stands for."""
    return sum(int(m.group(1)) if (m := _MORE.match(p)) else 1 for p in problems)


def shape_problems(view: dict[str, SourceTensor] | dict[str, tuple[int, ...]],
                   expected: dict[str, tuple[int, ...]], limit: int = 10) -> list[str]:
    """Missing and wrong-shape tensors (at most `limit` lines of each, then a count)."""
    shapes = {k: (v.shape if isinstance(v, SourceTensor) else v) for k, v in view.items()}
    missing = [k for k in expected if k not in shapes]
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    problems = [f"missing tensor {k} (the config expects {list(expected[k])})" for k in missing[:limit]]
    if len(missing) > limit:
        problems.append(f"... and {len(missing) - limit} more missing tensors")
    problems += [f"{k} has shape {list(shapes[k])}, the config expects {list(expected[k])}" for k in wrong[:limit]]
    if len(wrong) > limit:
        problems.append(f"... and {len(wrong) - limit} more tensors of the wrong shape")
    return problems


# ============================================================================================ plan

@dataclass(frozen=True)
class OutTensor:
    """One output tensor: copied/converted from `src`, or generated (`init`) when `src` is None."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    part: str  # "context", "denoiser" or "time"
    src: SourceTensor | None = None
    init: str | None = None  # "zeros", "normal" or "table" for generated tensors

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def is_copy(self) -> bool:
        return self.src is not None and self.src.dtype == self.dtype


@dataclass(frozen=True)
class OutShard:
    file: str
    header: bytes  # 8-byte length + JSON, exactly as written
    tensors: list[OutTensor]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class SplitPlan:
    source_name: str
    source_folder: Path
    config: dict[str, Any]  # the output config.json
    shards: list[OutShard]
    dtype: str  # "keep", "bf16", "fp16" or "fp32"
    transforms: list[str]
    dropped: list[str]  # source keys left out (and why, in `transforms`)
    aux_files: list[str]  # tokenizer / generation files copied as they are
    notes: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> list[OutTensor]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def parts(self) -> dict[str, dict[str, int]]:
        """Per part ("context", "denoiser", "time"): tensors, parameters and bytes."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            p = out.setdefault(t.part, {"tensors": 0, "parameters": 0, "bytes": 0})
            p["tensors"] += 1
            p["parameters"] += t.numel
            p["bytes"] += t.nbytes
        return out


def output_config(cfg: NemotronHConfig, mask_token_id: int, block_size: int, source: str,
                  shipped: set[str], dtype: str = "keep") -> tuple[dict[str, Any], list[str]]:
    """The TwoTower config.json (spec §3) and notes on what changed beyond the `twotower` block."""
    raw = cfg.to_dict()
    notes = []
    if dtype != "keep":  # transformers' `dtype="auto"` loads what the config says: say what was written
        for key in ("dtype", "torch_dtype"):  # v5 writes dtype, v4 torch_dtype
            if key in raw and raw[key] != TORCH_DTYPE_NAMES[dtype]:
                notes.append(f"config {key} {raw[key]!r} → {TORCH_DTYPE_NAMES[dtype]!r} (--dtype {dtype})")
                raw[key] = TORCH_DTYPE_NAMES[dtype]
    if "hybrid_override_pattern" not in raw:  # a v5 config with layers_block_type only: NVIDIA's layout and
        # transformers < 5 read the pattern string (the two agree: `normalise_pattern` checked them)
        raw["hybrid_override_pattern"] = cfg.pattern
        notes.append("config hybrid_override_pattern added beside layers_block_type (older readers need it)")
    raw["architectures"] = [TWOTOWER_ARCHITECTURE]
    raw["model_type"] = "nemotron_h"
    auto_map = raw.get("auto_map")
    if isinstance(auto_map, dict):
        # "configuration_nemotron_h.NemotronHConfig" needs configuration_nemotron_h.py beside it.
        kept = {k: v for k, v in auto_map.items()
                if all(f"{str(ref).split('--')[-1].rsplit('.', 1)[0]}.py" in shipped
                       for ref in (v if isinstance(v, list) else [v]) if ref)}
        if kept != auto_map:
            notes.append("dropped auto_map entries that point at remote code not shipped with the split")
            if kept:
                raw["auto_map"] = kept
            else:
                raw.pop("auto_map")
    raw["twotower"] = {
        "mask_token_id": mask_token_id,
        "block_size": block_size,
        "source": source,
        "format_version": FORMAT_VERSION,
        "cross_attention_layers": cfg.layer_indices("*"),
    }
    return raw, notes


def check_source_config(raw: dict[str, Any], name: str) -> None:
    """Refuse, from config.json alone (so before a hub source's weights download), what split cannot take:
    a TwoTower, or a quantized checkpoint (FP8 / NVFP4 weights need scale tensors no TwoTower layout has)."""
    arch = raw.get("architectures") or []
    if TWOTOWER_ARCHITECTURE in (arch if isinstance(arch, list) else [arch]):
        raise TwoTowerError(f"{name} is already a TwoTower checkpoint", "split takes a single-tower NemotronH checkpoint")
    quant = raw.get("quantization_config")
    if quant is not None:
        kind = (quant.get("quant_algo") or quant.get("quant_method")) if isinstance(quant, dict) else None
        raise TwoTowerError(f"{name} is a quantized checkpoint" + (f" ({kind})" if kind else "")
                            + ": split copies weights as they are and would drop their scales",
                            "split the BF16 checkpoint of the model (e.g. nemotron-3-nano) instead")


def _out_dtype(src_dtype: str, target: str | None, name: str) -> str:
    """The output dtype of a source tensor. The fp32-in-memory tensors of spec §1 (A_log, D, dt_bias,
    router) are never narrowed: an F32 source keeps F32 under --dtype bf16/fp16."""
    if target is None or src_dtype not in FLOAT_DTYPES:
        return src_dtype
    if keep_fp32(name) and src_dtype in {"F32", "F64"} and DTYPE_BYTES[target] < DTYPE_BYTES[src_dtype]:
        return src_dtype
    return target


def plan_split(ckpt: Checkpoint, cfg: NemotronHConfig, max_shard_size: int | str = "5GB", dtype: str = "keep",
               mask_token_id: int = 3, block_size: int = 16, source_name: str = "") -> SplitPlan:
    """The whole split as data; raises TwoTowerError if the source cannot make a sound TwoTower checkpoint."""
    dtype = DTYPE_ALIASES.get(dtype, dtype)  # the spellings train, eval and generate take
    if dtype not in DTYPE_CHOICES:
        raise TwoTowerError(f"unknown --dtype {dtype!r}", f"choose one of {', '.join(DTYPE_CHOICES)}")
    if block_size < 1:
        raise TwoTowerError(f"--block-size must be positive, not {block_size}", "NVIDIA's release uses 16")
    if not 0 <= mask_token_id < cfg.vocab_size:
        raise TwoTowerError(f"--mask-token-id {mask_token_id} is outside the vocabulary (size {cfg.vocab_size})",
                            "Nemotron's tokenizer uses 3")
    if cfg.is_twotower or any(n.startswith(("context_tower.", "denoiser_tower.")) for n in ckpt.tensors):
        raise TwoTowerError(f"{source_name or ckpt.folder} is already a TwoTower checkpoint",
                            "split takes a single-tower NemotronH checkpoint")
    check_source_config(cfg.raw, source_name or str(ckpt.folder))
    problems = index_problems(ckpt)
    if problems:
        raise TwoTowerError(f"the source checkpoint is not sound: {problems[0]}"
                            + (f" (and {count(len(problems) - 1, 'more problem')})" if len(problems) > 1 else ""),
                            "run `twotower inspect` on it for the full list")
    view = source_view(ckpt, cfg)
    src = dict(view.tensors)
    transforms = list(view.transforms)
    emb = src.get("backbone.embeddings.weight")  # if absent, the shape check below says so
    if cfg.tie_word_embeddings and "lm_head.weight" not in src and emb is not None:
        src["lm_head.weight"] = SourceTensor("lm_head.weight", emb.dtype, emb.shape, emb.file, emb.start,
                                             emb.end, emb.origin)
        transforms.append("tied embeddings: both heads written as copies of backbone.embeddings.weight")
    expected = nemotron_h_shapes(cfg) | {"lm_head.weight": (cfg.vocab_size, cfg.hidden_size)}
    problems = shape_problems(src, expected)
    problems += [f"unexpected tensor {n} (the config does not explain it)" for n in undroppable(view.unexpected)]
    for t in src.values():
        if t.dtype not in DTYPE_BYTES or t.nbytes != t.numel * DTYPE_BYTES[t.dtype]:
            problems.append(f"{t.origin}: {t.nbytes} bytes do not hold {t.dtype}{list(t.shape)}")
    if problems:
        more = problem_count(problems) - 1
        depth = layer_count_note(len(cfg.pattern), ckpt.tensors)
        raise TwoTowerError(f"the source does not match its config: {problems[0]}" + (f" (and {more} more)" if more else ""),
                            f"{depth}: use the config.json they were saved with" if depth
                            else "run `twotower inspect` on it for the full list")
    if view.dropped:
        transforms.append(f"dropped {count(len(view.dropped), 'tensor')} the model does not use (mtp.*, rotary buffers)")
    if view.unexpected:
        transforms.append(f"dropped {count(len(view.unexpected), 'tensor')} the config does not explain")

    target = DTYPE_CHOICES[dtype]
    tensors: list[OutTensor] = []
    for part, prefix, head_name in (("context", "context_tower.", "context_lm_head.weight"),
                                    ("denoiser", "denoiser_tower.", "lm_head.weight")):
        for k, s in src.items():  # source file order, head included where it lies: long contiguous runs
            name = head_name if k == "lm_head.weight" else prefix + k[len("backbone."):]
            tensors.append(OutTensor(name, _out_dtype(s.dtype, target, k), s.shape, part, s))
    time_dtype = target or src["lm_head.weight"].dtype  # time conditioning in the checkpoint's own dtype
    for name, shape in time_conditioning_shapes(cfg).items():
        init = "table" if name.startswith("scale_shift_tables.") else (
            "normal" if name.startswith("t_embedder.") and name.endswith(".weight") else "zeros")
        tensors.append(OutTensor(name, time_dtype, shape, "time", None, init))

    groups = _group_shards(tensors, parse_size(max_shard_size))
    shards = [OutShard(file, _aligned_header(group), group)
              for file, group in zip(shard_names(len(groups)), groups, strict=True)]

    aux = [p.name for p in sorted(ckpt.folder.iterdir()) if p.is_file() and _is_aux(p.name)]
    config, notes = output_config(cfg, mask_token_id, block_size, source_name, shipped=set(aux), dtype=dtype)
    return SplitPlan(source_name, ckpt.folder, config, shards, dtype, transforms,
                     view.dropped + view.unexpected, aux, notes)


def _group_shards(tensors: list[OutTensor], limit: int) -> list[list[OutTensor]]:
    """Output shards of at most `limit` tensor bytes (a larger tensor gets a shard of its own). Where a
    new run begins (another source file, or the second tower) and the current shard already holds
    `RUN_SHARD_MIN` bytes, a new shard starts: each large shard is then one contiguous run of one source
    file, copied in-kernel with aligned pages. Small checkpoints pack greedily (one file if they fit)."""
    groups: list[list[OutTensor]] = [[]]
    used = 0
    for t in tensors:
        last = groups[-1][-1] if groups[-1] else None
        new_run = last is not None and t.src is not None and (
            last.src is None or last.src.file != t.src.file or last.part != t.part)
        if groups[-1] and (used + t.nbytes > limit or (new_run and used >= RUN_SHARD_MIN)):
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    return groups


def _aligned_header(group: list[OutTensor], page: int = 4096) -> bytes:
    """The shard header, padded with spaces (as safetensors allows) so that the first copied tensor sits
    at the same offset modulo the page size as in its source file: copy_file_range then moves whole
    pages (unaligned copies measured ~1.6x slower on ext4)."""
    header = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in group], {"format": "pt"})
    offset = 0
    for t in group:
        if t.is_copy:
            assert t.src is not None
            shift = (t.src.start - offset - len(header)) % page
            if shift % 8 == 0 and shift:  # the data must stay 8-byte aligned
                text = header[8:] + b" " * shift
                header = struct.pack("<Q", len(text)) + text
            break
        offset += t.nbytes
    return header


def _is_aux(name: str) -> bool:
    from fnmatch import fnmatch

    from twotower_cli.hub import AUX_FILE_PATTERNS

    return any(fnmatch(name, p) for p in AUX_FILE_PATTERNS)


def load_source(path: Path, file_sizes: dict[str, int] | None = None) -> tuple[Checkpoint, NemotronHConfig]:
    """Headers and config of a split source (a folder, or a .safetensors file with config.json beside it;
    `file_sizes` as `open_checkpoint` takes them)."""
    ckpt = open_checkpoint(path, file_sizes=file_sizes)
    if ckpt.index is None and ckpt.files[0] in _indexed_files(ckpt.folder):
        # A file of a sharded checkpoint alone holds part of the model: say so, not "missing tensor ...".
        raise TwoTowerError(f"{ckpt.files[0]} is one shard of the checkpoint in {ckpt.folder} "
                            f"(it has {INDEX_NAME})", f"split the folder: twotower split {ckpt.folder}")
    if ckpt.config_raw is None:
        raise TwoTowerError(f"no config.json beside the weights in {ckpt.folder}",
                            "split needs the NemotronH config.json of the checkpoint")
    return ckpt, NemotronHConfig.from_dict(ckpt.config_raw)


def _indexed_files(folder: Path) -> set[str]:
    """The shard files the folder's index names (none when it has no readable index)."""
    try:
        weight_map = json.loads((folder / INDEX_NAME).read_text()).get("weight_map")
        return set(map(str, weight_map.values())) if isinstance(weight_map, dict) else set()
    except (OSError, ValueError, AttributeError):
        return set()


# ============================================================================================ bytes

def generated_chunks(t: OutTensor, chunk: int = BUFFER_BYTES) -> Iterator[bytes]:
    """Bytes of a generated time-conditioning tensor, in chunks (deterministic: verify regenerates them)."""
    import numpy as np

    if t.init == "zeros":
        for off in range(0, t.nbytes, chunk):
            yield bytes(min(chunk, t.nbytes - off))
    elif t.init == "table":  # rows shift=0, scale=0, gate=1: the identity modulation
        rows, width = t.shape
        yield _encode(np.concatenate([np.zeros((rows - 1) * width, np.float32), np.ones(width, np.float32)]), t.dtype)
    elif t.init == "normal":
        width = t.shape[-1]
        rows_per = max(1, chunk // (8 * width))  # rng.normal makes float64
        seed = zlib.crc32(t.name.encode())  # each tensor its own stream, independent of plan order
        for i, r0 in enumerate(range(0, t.shape[0], rows_per)):
            rng = np.random.default_rng([INIT_SEED, seed, i])
            n = min(rows_per, t.shape[0] - r0) * width
            yield _encode(rng.normal(0.0, INIT_STD, n).astype(np.float32), t.dtype)
    else:
        raise AssertionError(f"no initialiser {t.init!r} for {t.name}")


def _encode(x: Any, dtype: str) -> bytes:
    """A float numpy array → little-endian bytes of `dtype`; bf16 rounds to nearest even like torch
    (float64 goes through float32 first), NaN stays NaN."""
    import numpy as np

    if dtype == "BF16":
        u = x.astype(np.float32).view(np.uint32)
        out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
        out[np.isnan(x)] = 0x7FC0  # the rounding carry would turn some NaN payloads into ±0
        return out.tobytes()
    with np.errstate(over="ignore"):  # fp16 overflow: `converted_chunks` says which tensor, not numpy
        return x.astype({"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]).tobytes()


def _decode(raw: bytes, dtype: str) -> Any:
    """Little-endian bytes of a float dtype → a numpy array (bf16 widened exactly to float32)."""
    import numpy as np

    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype])


def converted_chunks(fd: int, t: OutTensor, chunk: int = BUFFER_BYTES) -> Iterator[bytes]:
    """Bytes of a source tensor converted to `t.dtype`, a chunk of elements at a time. numpy, not torch:
    bf16 is a shift away from float32, and the process stays small. fp16 is the one target whose range is
    narrower than its sources' (±65,504 against bf16's and fp32's 3.4e38): a finite value that would become
    Inf there is an error naming the tensor, so no checkpoint is written with Inf in it."""
    assert t.src is not None
    step = chunk - chunk % DTYPE_BYTES[t.src.dtype]
    for off in range(t.src.start, t.src.end, step):
        raw = _pread_exact(fd, min(step, t.src.end - off), off, t.src.file)
        data = _encode(_decode(raw, t.src.dtype), t.dtype)
        # the source's count is read only for a chunk whose fp16 holds a NaN or Inf (almost never)
        if t.dtype == "F16" and (bad := sum(nonfinite_counts(data, "F16"))) and \
                bad > sum(nonfinite_counts(raw, t.src.dtype)):
            raise TwoTowerError(f"{t.name} holds values beyond fp16's range (±65,504), which --dtype fp16 would "
                                "write as Inf", "use --dtype bf16 (fp32's range) or leave --dtype out")
        yield data


def _pread_exact(fd: int, n: int, offset: int, name: str) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise TwoTowerError(f"{name} ended early: wanted bytes {offset}..{offset + n}",
                                "the source file is truncated; re-download it")
        data += more
    return data


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class RangeCopier:
    """Copies file byte ranges with the fastest method the system allows, falling back once per failure
    kind: copy_file_range (in-kernel, may reflink) → sendfile (in-kernel) → pread/pwrite."""

    METHODS = ("copy_file_range", "sendfile", "buffered")

    def __init__(self, method: str | None = None):
        if method is None:
            method = "copy_file_range" if hasattr(os, "copy_file_range") else (
                "sendfile" if hasattr(os, "sendfile") else "buffered")
        self.method = method

    def copy(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int, name: str) -> None:
        while n > 0:
            try:
                done = self._step(src_fd, src_off, dst_fd, dst_off, n, name)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSUP) \
                        or self.method == "buffered":
                    raise
                self.method = self.METHODS[self.METHODS.index(self.method) + 1]
                continue
            if done == 0:
                raise TwoTowerError(f"{name} ended early at byte {src_off}",
                                    "the source file is truncated; re-download it")
            src_off, dst_off, n = src_off + done, dst_off + done, n - done

    def _step(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int, name: str) -> int:
        n = min(n, CHUNK_BYTES)
        if self.method == "copy_file_range":
            return os.copy_file_range(src_fd, dst_fd, n, src_off, dst_off)
        if self.method == "sendfile":
            os.lseek(dst_fd, dst_off, os.SEEK_SET)  # sendfile writes at the output file's position
            return os.sendfile(dst_fd, src_fd, src_off, n)
        data = os.pread(src_fd, min(n, BUFFER_BYTES), src_off)
        _write_all(dst_fd, data, dst_off)
        return len(data)


# ============================================================================================ execute

@dataclass
class SplitResult:
    out: Path
    bytes_written: int
    bytes_verified: int
    copy_method: str


def execute(plan: SplitPlan, out: str | Path, force: bool = False, verify: bool = False,
            on_bytes: Callable[[int], None] | None = None, copier: RangeCopier | None = None,
            on_phase: Callable[[str], None] | None = None) -> SplitResult:
    """Write the planned checkpoint to `out` atomically; `on_bytes(n)` reports progress, `on_phase(name)` the
    phases after the copy: "verify" (with `verify`), then "sync" (the output going to the disk)."""
    out = Path(out)
    check_output(out, plan.source_folder)
    copier = copier or RangeCopier()
    report = on_bytes or (lambda n: None)
    written = verified = 0
    phase = on_phase or (lambda name: None)
    with atomic_output_dir(out, force=force, on_sync=lambda: phase("sync")) as tmp, \
            _SourceFiles(plan.source_folder) as sources:
        for file in {t.src.file for s in plan.shards for t in s.tensors if t.src is not None}:
            sources.fd(file)  # open every source shard up front: the workers below only read the table
        stop = threading.Event()

        def write_shard(shard: OutShard) -> int:
            fd = os.open(tmp / shard.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, shard.header, 0)
                pos = len(shard.header)
                for item in _runs(shard.tensors):
                    if isinstance(item, tuple):  # bytes that are contiguous in one source file: one copy
                        file, start, end = item
                        while start < end:  # in chunks, so progress moves and a stop is prompt
                            if stop.is_set():
                                raise _Stopped()
                            n = min(CHUNK_BYTES, end - start)
                            copier.copy(sources.fd(file), start, fd, pos, n, file)
                            start, pos = start + n, pos + n
                            report(n)
                    else:
                        t = item
                        chunks = generated_chunks(t) if t.src is None else converted_chunks(sources.fd(t.src.file), t)
                        for data in chunks:
                            _write_all(fd, data, pos)
                            pos += len(data)
                            report(len(data))
                if pos != shard.size:
                    raise AssertionError(f"{shard.file}: wrote {pos} bytes, planned {shard.size}")
                return pos
            finally:
                os.close(fd)

        # Shards are independent files: two writers keep both cores copying (the in-kernel copy is
        # CPU-bound memcpy when the source is in the page cache). Any failure or Ctrl-C stops the other
        # writer at its next chunk and is re-raised here, before the temporary folder is removed.
        with ThreadPoolExecutor(max_workers=min(SPLIT_WORKERS, len(plan.shards)) or 1) as pool:
            futures = [pool.submit(write_shard, shard) for shard in plan.shards]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C while waiting
                stop.set()
                wait(futures)
                raise
            failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if failed:
                stop.set()
                wait(futures)
                raise next((e for e in failed if not isinstance(e, _Stopped)), failed[0])
            written = sum(f.result() for f in futures)
        if len(plan.shards) > 1:
            write_index(tmp, {t.name: s.file for s in plan.shards for t in s.tensors}, plan.tensor_bytes)
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        for name in plan.aux_files:
            shutil.copyfile(plan.source_folder / name, tmp / name)
        if verify:
            phase("verify")
            verified = verify_output(plan, tmp, sources)
    return SplitResult(out, written, verified, copier.method)


def check_output(out: Path, source_folder: Path) -> None:
    """Refuse an OUT whose replacement (`--force`) would delete the source checkpoint or the folder the
    command runs in, and an OUT inside the source folder (`checkpoint.check_output_folder`, which `train`
    shares)."""
    check_output_folder(out, source_folder)


class _Stopped(Exception):
    """A writer told to stop because another one failed (never the error that is reported)."""


def _runs(tensors: list[OutTensor]) -> Iterator[tuple[str, int, int] | OutTensor]:
    """Copied tensors merged into (file, start, end) runs of contiguous source bytes; others as they are."""
    run: list[Any] | None = None
    for t in tensors:
        if t.is_copy:
            assert t.src is not None
            if run and run[0] == t.src.file and run[2] == t.src.start:
                run[2] = t.src.end
                continue
            if run:
                yield tuple(run)  # type: ignore[misc]
            run = [t.src.file, t.src.start, t.src.end]
        else:
            if run:
                yield tuple(run)  # type: ignore[misc]
                run = None
            yield t
    if run:
        yield tuple(run)  # type: ignore[misc]


class _SourceFiles:
    """Read-only descriptors of the source shards, opened on first use and closed together."""

    def __init__(self, folder: Path):
        self.folder, self.fds = folder, {}

    def fd(self, file: str) -> int:
        if file not in self.fds:
            self.fds[file] = os.open(self.folder / file, os.O_RDONLY)
        return self.fds[file]

    def __enter__(self) -> _SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)


def verify_output(plan: SplitPlan, folder: Path, sources: _SourceFiles | None = None) -> int:
    """Re-read every output tensor and compare it with what the plan says it must hold (the source bytes
    for copies, the conversion for converted tensors, the initial values for time conditioning). Also
    re-reads the output headers and index. Returns the tensor bytes verified; raises on any mismatch."""
    own = sources is None
    sources = sources or _SourceFiles(plan.source_folder)
    try:
        ckpt = open_checkpoint(folder)
        problems = index_problems(ckpt)
        if problems:
            raise TwoTowerError(f"verification failed: {problems[0]}", "the output is corrupt; run split again")
        total = 0
        for shard in plan.shards:
            fd = os.open(folder / shard.file, os.O_RDONLY)
            try:
                for t in shard.tensors:
                    info = ckpt.tensors.get(t.name)
                    if info is None or info.dtype != t.dtype or info.shape != t.shape:
                        raise TwoTowerError(f"verification failed: {t.name} is not in {shard.file} as planned",
                                            "the output is corrupt; run split again")
                    pos = info.file_range[0]
                    if t.is_copy:
                        assert t.src is not None
                        expected: Iterator[bytes] = (
                            _pread_exact(sources.fd(t.src.file), min(BUFFER_BYTES, t.src.end - o), o, t.src.file)
                            for o in range(t.src.start, t.src.end, BUFFER_BYTES))
                    elif t.src is None:
                        expected = generated_chunks(t)
                    else:
                        expected = converted_chunks(sources.fd(t.src.file), t)
                    for data in expected:
                        if _pread_exact(fd, len(data), pos, shard.file) != data:
                            raise TwoTowerError(f"verification failed: {t.name} differs from its source",
                                                "the output is corrupt (disk error?); run split again")
                        pos += len(data)
                        total += len(data)
            finally:
                os.close(fd)
        return total
    finally:
        if own:
            sources.__exit__()
