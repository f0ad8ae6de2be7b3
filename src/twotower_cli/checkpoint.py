"""safetensors I/O and nothing else: headers, the shard index, lazy per-tensor reads, sharded atomic writes.

Reading a checkpoint never touches tensor data until a tensor is asked for: `open_checkpoint` parses the
8-byte length and JSON header of each shard (plus `model.safetensors.index.json` when sharded) and
records, per tensor, its dtype, shape, file and byte range. `Checkpoint.read` goes through
`safetensors.safe_open` (memory-mapped). Writing goes shard by shard into a temporary folder that is
renamed into place at the end, so a failure never leaves a half-written checkpoint.

The header layer does not import torch, so header-only commands (inspect, split --dtype keep) stay light.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twotower_cli.errors import TwoTowerError, host_out_of_memory

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# A floating-point value is NaN or Inf when every bit of its exponent is set; Inf when its mantissa is 0 as
# well. Per safetensors dtype: (little-endian unsigned view, exponent bits, mantissa bits). F8_E4M3 (the
# "fn" variant) has no Inf, and its only NaN is S.1111.111: its "exponent" here is those seven bits.
FLOAT_BITS = {"F64": ("<u8", 0x7FF0000000000000, 0x000FFFFFFFFFFFFF), "F32": ("<u4", 0x7F800000, 0x007FFFFF),
              "F16": ("<u2", 0x7C00, 0x03FF), "BF16": ("<u2", 0x7F80, 0x007F), "F8_E5M2": ("u1", 0x7C, 0x03),
              "F8_E4M3": ("u1", 0x7F, None)}


def nonfinite_counts(data: bytes | memoryview, dtype: str) -> tuple[int, int]:
    """NaN and Inf counts of the little-endian `dtype` values (a FLOAT_BITS key) in `data`, from their bits
    alone (no conversion; a partial last value is ignored). The common case, none, costs one masked max."""
    import numpy as np

    view, exponent, mantissa = FLOAT_BITS[dtype]
    bits = np.frombuffer(data, dtype=view, count=len(data) // DTYPE_BYTES[dtype])
    masked = bits & exponent
    if not len(bits) or masked.max() != exponent:  # no value has every exponent bit set
        return 0, 0
    hits = bits[masked == exponent]
    inf = 0 if mantissa is None else int(np.count_nonzero((hits & mantissa) == 0))
    return len(hits) - inf, inf


TORCH_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                     "bf16": "bfloat16", "bfloat16": "bfloat16", "fp64": "float64", "float64": "float64"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `data_offsets` are relative to the end of the file's header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    data_offsets: tuple[int, int]
    header_size: int  # bytes before tensor data: 8 + header length

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def file_range(self) -> tuple[int, int]:
        """Absolute [start, end) byte range of the tensor's data in its file."""
        return self.header_size + self.data_offsets[0], self.header_size + self.data_offsets[1]


@dataclass(frozen=True)
class ShardHeader:
    file: str
    header_size: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_shard_header(path: Path) -> ShardHeader:
    """Parse one safetensors file's header without reading its data. Raises TwoTowerError if malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise TwoTowerError(f"{path.name} is truncated: {size} bytes, no safetensors header",
                                    "re-download or re-write the file")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise TwoTowerError(f"{path.name} is corrupt or truncated: header length {n} does not fit "
                                    f"a {size}-byte file", "re-download or re-write the file")
            header = json.loads(f.read(n))
    except OSError as e:
        raise TwoTowerError(f"cannot read {path}: {e.strerror or e}", "check the path and permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TwoTowerError(f"{path.name} has a corrupt safetensors header", "re-download or re-write the file") from None
    if not isinstance(header, dict):
        raise TwoTowerError(f"{path.name} has a corrupt safetensors header", "re-download or re-write the file")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TwoTowerError(f"{path.name}: __metadata__ is not a map of strings", "re-download or re-write the file")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:  # types as strict as safetensors' own parser: 0.5 or "4" as an offset is not 0 or 4
            offsets = entry["data_offsets"]
            if not isinstance(entry["dtype"], str) or len(offsets) != 2:
                raise ValueError
            info = TensorInfo(name, entry["dtype"], tuple(_uint(s) for s in entry["shape"]), path.name,
                              (_uint(offsets[0]), _uint(offsets[1])), 8 + n)
        except (KeyError, TypeError, ValueError, IndexError):
            raise TwoTowerError(f"{path.name}: malformed header entry for {name!r}",
                                "re-download or re-write the file") from None
        tensors[name] = info
    return ShardHeader(path.name, 8 + n, size, tensors, metadata)


def _uint(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def shard_problems(shard: ShardHeader) -> list[str]:
    """Consistency of a shard's byte layout, as safetensors checks it on load: sizes matching dtype × shape,
    and the tensors filling the data bytes exactly, back to back (no overlap, no gap, nothing after the
    last one, nothing missing: a truncated file is one line, however many tensors it cuts)."""
    problems = []
    data_len = shard.file_size - shard.header_size
    spans = []
    for t in shard.tensors.values():
        begin, end = t.data_offsets
        if end < begin:
            problems.append(f"{shard.file}: {t.name} has invalid data offsets {list(t.data_offsets)}")
            continue
        if t.dtype not in DTYPE_BYTES:
            problems.append(f"{shard.file}: {t.name} has unknown dtype {t.dtype}")
        elif t.nbytes != t.numel * DTYPE_BYTES[t.dtype]:
            problems.append(f"{shard.file}: {t.name} spans {t.nbytes} bytes but {t.dtype}{list(t.shape)} needs "
                            f"{t.numel * DTYPE_BYTES[t.dtype]}")
        spans.append((begin, end, t.name))
    spans.sort()
    covered, last = 0, None
    for begin, end, name in spans:
        if begin > covered:
            problems.append(f"{shard.file}: data bytes {covered}..{begin} " + (f"between {last} and {name}" if last
                            else f"before {name}") + " belong to no tensor")
        elif begin < covered and last is not None:
            problems.append(f"{shard.file}: tensors {last} and {name} overlap")
        if end >= covered:
            covered, last = end, name
    if covered > data_len:
        cut = [name for _b, end, name in spans if end > data_len]
        problems.append(f"{shard.file} is truncated: its tensors need {covered:,} data bytes, it holds {data_len:,} "
                        f"({len(cut)} tensor{'s' * (len(cut) > 1)} cut short, from {cut[0]})")
    elif covered < data_len:
        problems.append(f"{shard.file}: {data_len - covered:,} data bytes after the last tensor belong to no tensor "
                        "(safetensors refuses such a file)")
    return problems


@dataclass
class Checkpoint:
    """A checkpoint folder (or single file) seen through its headers; tensors are read on demand."""

    folder: Path
    files: list[str]  # shard file names, in order
    shards: dict[str, ShardHeader]  # headers of the files that exist
    tensors: dict[str, TensorInfo]  # name → where it actually is (first shard holding it)
    index: dict[str, str] | None  # weight_map from the index, when sharded
    index_metadata: dict[str, Any]
    missing_files: list[str]
    duplicates: dict[str, list[str]]  # tensor → every shard holding it (only when more than one)
    config_raw: dict[str, Any] | None
    unreadable: dict[str, str] = field(default_factory=dict)  # shard → why its header is unusable (strict=False)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def path(self, file: str) -> Path:
        return self.folder / file

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, memory-mapped through safe_open."""
        from safetensors import safe_open

        info = self.tensors.get(name)
        if info is None:
            raise TwoTowerError(f"tensor {name!r} is not in the checkpoint at {self.folder}",
                                "the checkpoint may be incomplete")
        try:
            with safe_open(str(self.path(info.file)), framework="pt", device=str(device)) as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types on corrupt files
            raise _read_error(f"{name} from {info.file}", device, e) from None

    def iter_tensors(self, names: Iterable[str], device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors grouped by file so each shard is opened once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.tensors:
                raise TwoTowerError(f"tensor {n!r} is not in the checkpoint at {self.folder}",
                                    "the checkpoint may be incomplete")
            by_file.setdefault(self.tensors[n].file, []).append(n)
        for file, group in by_file.items():
            try:
                with safe_open(str(self.path(file)), framework="pt", device=str(device)) as f:
                    for n in group:
                        yield n, f.get_tensor(n)
            except TwoTowerError:
                raise
            except Exception as e:
                raise _read_error(file, device, e) from None


def _read_error(what: str, device: str | torch.device, e: Exception) -> TwoTowerError:
    """The error for a tensor read that failed: out of memory (on a GPU, or in host memory) is said as such,
    with what may make room; anything else is the file's fault (safetensors' own errors, a short read)."""
    import torch

    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or host_out_of_memory(e) is not None:
        on_host = not isinstance(e, torch.cuda.OutOfMemoryError) or torch.device(device).type == "cpu"
        where = "host memory" if on_host else f"memory on {device}"
        return TwoTowerError(f"out of {where} reading {what}",
                             "load a smaller --dtype (bf16), put a tower on another --device, or free memory "
                             "(other processes on the GPU)")
    return TwoTowerError(f"cannot read {what}: {e}", "the file may be truncated or corrupt")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TwoTowerError(f"{path.name} is not valid JSON: {e}", "the file may be truncated or corrupt") from None
    except OSError as e:
        raise TwoTowerError(f"cannot read {path}: {e.strerror or e}", "check the path and permissions") from None


def _read_index(folder: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The index's weight_map and metadata, or a `TwoTowerError` saying how the index is corrupt."""
    idx = _read_json(folder / INDEX_NAME)
    if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
        raise TwoTowerError(f"{INDEX_NAME} has no weight_map", "the index file is corrupt")
    index = {str(k): str(v) for k, v in idx["weight_map"].items()}
    for file in sorted(set(index.values())):  # shards are files of this folder: not "../other/x", not "/x"
        if Path(file).name != file or file in (".", ".."):
            raise TwoTowerError(f"{INDEX_NAME} places tensors in {file!r}, which is not a file of {folder}",
                                "the index file is corrupt: its weight_map names shard files beside it")
    return index, idx.get("metadata") or {}


def open_checkpoint(path: str | Path, strict: bool = True, file_sizes: dict[str, int] | None = None) -> Checkpoint:
    """Headers of a checkpoint folder, or of a single `.safetensors` file (its folder's config.json is used).

    strict=False records a shard whose header cannot be parsed, and a config.json or index that cannot be read,
    in `unreadable` (and `index_problems`) instead of raising (an unreadable index: the folder's shards are
    read as if there were none), so that `inspect` can report every problem at once. `file_sizes`: each
    shard's true size, where the folder holds only the shards' headers (a hub repository's, `remote`)."""
    path = Path(path)
    unreadable: dict[str, str] = {}
    index = None
    if path.is_file() and path.suffix == ".safetensors":
        folder, files, index, index_meta = path.parent, [path.name], None, {}
    elif path.is_dir():
        folder = path
        if (folder / INDEX_NAME).is_file():
            try:
                index, index_meta = _read_index(folder)
            except TwoTowerError as e:
                if strict:
                    raise
                unreadable[INDEX_NAME] = e.message  # inspect reports it, with what the shards beside it hold
        if index is not None:
            files = sorted(set(index.values()))
        elif (folder / SINGLE_NAME).is_file() and INDEX_NAME not in unreadable:
            files, index, index_meta = [SINGLE_NAME], None, {}
        else:
            found = sorted(p.name for p in folder.glob("*.safetensors"))
            if not found and INDEX_NAME in unreadable:
                raise TwoTowerError(unreadable[INDEX_NAME], "the index file is corrupt, and no shards lie beside it")
            if not found:
                raise TwoTowerError(f"no safetensors weights in {folder}",
                                    "expected model.safetensors or model.safetensors.index.json with its shards")
            files, index, index_meta = found, None, {}
    elif path.exists():
        raise TwoTowerError(f"{path} is neither a checkpoint folder nor a .safetensors file",
                            "pass a folder with config.json and safetensors weights")
    else:
        raise TwoTowerError(f"{path} does not exist", "pass a checkpoint folder, a .safetensors file or a model name")

    shards: dict[str, ShardHeader] = {}
    missing = []
    tensors: dict[str, TensorInfo] = {}
    holders: dict[str, list[str]] = {}
    for file in files:
        p = folder / file
        if not p.is_file():
            missing.append(file)
            continue
        try:
            shard = read_shard_header(p)
        except TwoTowerError as e:
            if strict:
                raise
            unreadable[file] = e.message
            continue
        if file_sizes is not None:
            shard = replace(shard, file_size=file_sizes[file])
        shards[file] = shard
        for name, info in shard.tensors.items():
            holders.setdefault(name, []).append(file)
            tensors.setdefault(name, info)
    if index is not None:  # prefer the shard the index names when a tensor appears twice
        for name, file in index.items():
            if file in shards and name in shards[file].tensors:
                tensors[name] = shards[file].tensors[name]
    config_raw = None
    if (folder / "config.json").is_file():
        try:
            config_raw = _read_json(folder / "config.json")
        except TwoTowerError as e:
            if strict:
                raise
            unreadable["config.json"] = e.message  # inspect reports it (with --json too), not one Error line
    return Checkpoint(folder, files, shards, tensors, index, index_meta, missing,
                      {n: fs for n, fs in holders.items() if len(fs) > 1}, config_raw, unreadable)


def index_problems(ckpt: Checkpoint) -> list[str]:
    """Disagreements between the index, the shards and their byte layouts."""
    problems = [f"shard {f} named in the index is missing" for f in ckpt.missing_files]
    problems += list(ckpt.unreadable.values())
    for shard in ckpt.shards.values():
        problems += shard_problems(shard)
    if ckpt.index is not None:
        for name, file in sorted(ckpt.index.items()):
            if file in ckpt.shards and name not in ckpt.shards[file].tensors:
                problems.append(f"{name} is listed in the index under {file} but that shard does not hold it")
        for file, shard in ckpt.shards.items():
            for name in shard.tensors:
                if ckpt.index.get(name) != file:
                    problems.append(f"{name} is in {file} but the index does not list it there")
        total = ckpt.index_metadata.get("total_size") if isinstance(ckpt.index_metadata, dict) else None
        if total is not None:
            try:
                total_int = int(total)
            except (TypeError, ValueError):
                total_int = -1
            if total_int != ckpt.total_bytes and not ckpt.missing_files and not ckpt.unreadable:
                problems.append(f"index total_size is {total} but the tensors hold {ckpt.total_bytes} bytes")
    for name, files in sorted(ckpt.duplicates.items()):
        problems.append(f"{name} appears in more than one shard: {', '.join(files)}")
    return problems


# ---------------------------------------------------------------------------------------------- writing

def encode_header(entries: Iterable[tuple[str, str, tuple[int, ...], int]],
                  metadata: dict[str, str] | None = None) -> bytes:
    """The bytes before the data of a safetensors file whose tensors are `(name, dtype, shape, nbytes)`
    laid out back to back in this order: 8-byte little-endian length, then the JSON header padded with
    spaces to a multiple of 8 (as safetensors writes it, so the data starts aligned)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' → bytes (decimal units as Hugging Face uses them)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
    for unit, mult in units.items():  # noqa: B007 (mult is used after the loop)
        if s.endswith(unit):
            num = s[: -len(unit)]
            break
    else:
        num, mult = s, 1
    try:
        value = int(float(num) * mult)
    except (ValueError, OverflowError):  # "lots", "nan", "inf"
        raise TwoTowerError(f"cannot read the size {text!r}", "write it like 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise TwoTowerError(f"size {text!r} must be positive", "write it like 5GB, 500MB or 2GiB")
    return value


def size_text(n: int) -> str:
    """Bytes for a message: "126.37 GB", "0.52 MB", "28,704 B"."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,} B"


def short_of_space(needs: Iterable[tuple[int, Path, str]]) -> list[tuple[int, list[str], int]]:
    """The disks that `needs` (bytes, a path that will hold them, what writes them) puts more on than they have
    free, as (bytes, whats, free bytes). A path that does not exist yet is measured at its nearest existing
    folder; a disk that cannot be measured is left out."""
    disks: dict[int, tuple[int, list[str], int]] = {}  # device → (bytes, whats, free)
    for size, path, what in needs:
        where = Path(path).expanduser().absolute()
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            device, free = where.stat().st_dev, shutil.disk_usage(where).free
        except OSError:
            continue
        total, whats, _free = disks.get(device, (0, [], free))
        disks[device] = (total + size, [*whats, what], free)
    return [(total, whats, free) for total, whats, free in disks.values() if free < total]


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def assign_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving grouping of (name, nbytes) into shards of at most max_shard_bytes
    (a single tensor larger than the limit gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    return groups if groups[0] else []


def _can_write(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_writable(out: str | Path) -> None:
    """Refuse an output (folder or file) that could not be written, before any work: its nearest existing
    folder (where the temporary output goes, or the missing folders are made) must be a folder, and one this
    process may write in. Found only when writing, that failed after a whole training, named a file's
    temporary name, or said "File exists" for a file standing where a folder should be."""
    target = Path(os.path.abspath(Path(out).expanduser()))
    for above in target.parents:
        if above.exists():
            break
    if not above.is_dir():
        raise TwoTowerError(f"{above} is a file, not a folder: {out} cannot be made under it",
                            f"choose another -o, e.g. -o {above.parent / target.name}")
    if not _can_write(above):
        raise TwoTowerError(f"cannot write in {above} (no permission): {out} cannot be made there",
                            "choose an -o in a folder you can write to")


def check_output_folder(out: str | Path, source_folder: str | Path | None, *, may_be_source: bool = False,
                        inputs: Iterable[tuple[str, str | Path]] = ()) -> None:
    """Refuse an output folder whose replacement (`--force`, or `train`'s saves, which replace OUT each
    time) would delete what the command reads or the folder it runs in: OUT may not be the source
    checkpoint (unless `may_be_source`: `train --resume`, whose source is OUT), nor hold it, nor hold the
    current folder, nor hold one of the `inputs` ((what, path): the files read while OUT is written).
    OUT inside the source folder is refused too (a run in the source folder, `split .`: the source is
    only read, and a hub cache snapshot is no place for an output that deleting the cached model would
    delete too). `source_folder=None`: no source to protect (a hub id not in a local folder). Paths are
    compared resolved (symlinks followed), whether they exist yet or not. An OUT that is a file (or anything
    but a folder) is refused: the output is a folder, and `--force` replaced the file with one; so is a symbolic
    link (`-o ckpt` → /scratch/ckpt): the output replaced the link, leaving its target stale."""
    target = Path(out).expanduser().resolve()
    if Path(out).expanduser().is_symlink():  # the new output takes OUT's name: the link, not what it points to
        raise TwoTowerError(f"the output {out} is a symbolic link (to {target}): the new output would replace the "
                            "link, and what it points to would stay as it was", f"pass -o {target}")
    if target.exists() and not target.is_dir():
        raise TwoTowerError(f"the output {out} is a file, not a folder: the output is a checkpoint folder, and "
                            "--force replaces only an earlier output folder", "choose another -o")

    def holds(path: str | Path) -> bool:
        path = Path(path).expanduser().resolve()
        return path == target or target in path.parents

    if source_folder is not None:
        source = Path(source_folder).expanduser().resolve()
        if target == source:
            if not may_be_source:
                raise TwoTowerError("the output folder is the source folder", "choose another -o")
        elif holds(source):
            raise TwoTowerError(f"the output folder {out} holds the source checkpoint {source_folder}: replacing "
                                "it would delete the source", "choose another -o")
        elif source in target.parents:
            raise TwoTowerError(f"the output folder {out} is inside the source checkpoint {source_folder}",
                                f"choose an -o outside it, e.g. -o {source.parent / target.name}")
    if holds(Path.cwd()):
        raise TwoTowerError(f"the output folder {out} is the current folder or holds it: replacing it would delete "
                            "everything in it", "choose another -o, e.g. a new folder inside this one")
    for what, path in inputs:
        if holds(path):
            raise TwoTowerError(f"the output folder {out} holds the {what} {path}: replacing the folder would "
                                "delete it", f"keep the {what} outside the output folder, or choose another -o")
    check_writable(out)


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, on_sync: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any failure it is removed.
    `on_sync()` is called as the finished output starts going to the disk (a progress display can say so:
    for a large output that is the last wait).

    Guarantee, for a crash (SIGKILL, power loss) at any moment as much as for an exception:
    - OUT is never half written: it names the previous output or the new one, complete (or, only in the
      fallback below, neither until the next run). The new one's files and folders are on the disk
      (fsync) before it takes OUT's name, and OUT's folder after, so that a power loss finds them written.
    - Replacing an existing OUT (`force`), the two are swapped in one step where the system can
      (Linux `renameat2(RENAME_EXCHANGE)`: ext4, xfs, btrfs, tmpfs...), so OUT is never missing; the old
      one, now under the temporary name, is then removed. Elsewhere (other systems, NFS) OUT is moved aside
      to `.OUT.old-MACHINE-PID` and the new one moved in; an exception between the two moves puts the old
      one back, and after a crash between them OUT is missing until the next `settle_output(OUT)`.
    - Once the new output holds OUT's name the write has succeeded: an exception after that (Ctrl-C or
      SIGTERM while the old output is removed) ends the block normally, and what is left of the old output
      is settled later; such an interrupt is kept for `deferred_interrupt()`. Without `force`, an OUT that appears while the output is written (another run) is
      an error, not replaced.
    - What a crash leaves beside OUT is settled by the next call for the same OUT (`settle_output`, run
      first here; `train` runs it before it looks for OUT to resume): the old output put back as OUT if
      OUT is missing, leftovers removed, so a crash costs the unfinished output and nothing else. (Only
      leftovers of this machine's processes that no longer run: see `settle_output`. Not on Windows,
      where no process can be asked after safely (`_alive`): there they stay for the user.)"""
    settle_output(out)
    if Path(out).exists() and not force:
        raise TwoTowerError(f"{out} already exists", "pass --force to replace it, or choose another -o")
    out = Path(os.path.abspath(out))  # "." or "run/.." has no name to put the temporary folder beside
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(_leftover_name(out, "old"))  # the fallback's place for the old output
    with _WRITING_LOCK:  # registered before another thread's `settle_output` can see it
        _DEFERRED.clear()  # one an earlier write kept that nobody took is not this write's
        tmp = Path(tempfile.mkdtemp(prefix=_leftover_name(out, "tmp") + "-", dir=out.parent))
        _WRITING.update((str(tmp), str(old)))
    new = None  # (device, inode) of the finished output: OUT is the new output when it has them
    try:
        yield tmp
        _publish_modes(tmp)
        if on_sync is not None:
            on_sync()
        _sync_tree(tmp)
        st = os.lstat(tmp)
        new = (st.st_dev, st.st_ino)
        aside = _swap_in(tmp, out, old, force)
        _fsync(out.parent, folder=True)  # the new name itself
        if aside is not None:
            _remove(aside)
    except BaseException as e:
        if not _holds(out, new):  # not written: OUT is as it was
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # OUT holds the new output, whole (its files are on the disk): the write succeeded, whatever came
        # after it. What is left of the old one (under `tmp` or `old`) goes at the next `settle_output(OUT)`.
        if not isinstance(e, (KeyboardInterrupt, OSError)):
            raise
        if isinstance(e, KeyboardInterrupt):  # still a request to stop, for a caller that goes on after this
            with _WRITING_LOCK:
                _DEFERRED.append(e)
    finally:
        with _WRITING_LOCK:
            _WRITING.difference_update((str(tmp), str(old)))


def _swap_in(tmp: Path, out: Path, old: Path, force: bool) -> Path | None:
    """Give the finished output `tmp` the name `out`; returns where the previous output now is (None: there
    was none). The fallback's two renames are undone on an exception between them."""
    if not os.path.lexists(out):
        os.replace(tmp, out)  # (what appeared there since is not replaced: rename refuses a file or a full folder)
        return None
    if not force and os.path.exists(out):
        raise TwoTowerError(f"{out} appeared while the output was written (another run writing it?)",
                            "pass --force to replace it, or choose another -o")
    if _exchange(tmp, out):
        return tmp  # the old output, now under the temporary name
    try:
        os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if os.path.lexists(old) and not os.path.lexists(out):
            os.replace(old, out)
        raise
    return old


def _holds(out: Path, new: tuple[int, int] | None) -> bool:
    """Whether OUT is now the finished output whose (device, inode) is `new`."""
    if new is None:
        return False
    try:
        st = os.lstat(out)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == new


def settle_output(out: Path) -> list[Path]:
    """Settle what `atomic_output_dir` left beside OUT in a process of this machine that no longer runs (a
    crash): its previous output moved aside (`.OUT.old-MACHINE-PID`) is put back as OUT if OUT is missing
    (the crash came between the two moves) and removed otherwise (it came after them); its temporary
    folders (`.OUT.tmp-MACHINE-PID-*`: an unfinished output, or an old one swapped out) are removed. A live
    process's are left alone, so are other names. Safe to run from several processes at once (the ranks of
    a job).

    A process id says whether a writer runs only on its own host and in its own PID namespace, so every
    leftover carries its writer's `_machine()`: those of another one (another host or container sharing
    the folder, or a run before a reboot) are left alone, as are names without one (written by an older
    version); they are returned, for a caller that wants to mention them."""
    out = Path(os.path.abspath(out))
    try:
        names = sorted(os.listdir(out.parent))
    except OSError:  # no parent folder yet: nothing to settle
        return []
    me = _machine()
    # .OUT.old-MACHINE-PID, .OUT.tmp-MACHINE-PID-RANDOM (and older versions' names, without MACHINE)
    leftover = re.compile(rf"\.{re.escape(out.name)}\.(?:old-(?:(?P<om>[0-9a-f]{{12}})-)?(?P<op>\d+)"
                          rf"|tmp-(?:(?P<tm>[0-9a-f]{{12}})-)?(?P<tp>\d+)-[a-z0-9_]+)")
    foreign = []
    for name in names:
        m = leftover.fullmatch(name)
        if m is None:
            continue
        path = out.parent / name
        if (m["om"] or m["tm"]) != me:
            foreign.append(path)
            continue
        if _writing(path, int(m["op"] or m["tp"])):
            continue
        try:
            if m["op"] and not os.path.lexists(out):
                os.replace(path, out)
            else:
                _remove(path)
        except FileNotFoundError:  # another process settled it first
            pass
    return foreign


def scratch_path(out: Path, kind: str, suffix: str = "") -> Path:
    """`.OUT.KIND-MACHINE-PID[SUFFIX]` beside the file OUT: what this process writes on its way to OUT, which
    `settle_scratch(OUT, KIND)` removes once the process is gone (a crash, a kill -9)."""
    out = Path(out)
    return out.with_name(_leftover_name(out, kind) + suffix)


def settle_scratch(out: Path, kinds: tuple[str, ...]) -> None:
    """Remove the `scratch_path(OUT, KIND)` files that this machine's processes no longer running left
    beside OUT (another machine's, or a live process's, are left alone: `settle_output`)."""
    out = Path(os.path.abspath(out))
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{'|'.join(map(re.escape, kinds))})-"
                         rf"(?P<m>[0-9a-f]{{12}})-(?P<p>\d+)(?:\.[a-z]+)?")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m and m["m"] == _machine() and int(m["p"]) != os.getpid() and not _alive(int(m["p"])):
            try:
                (out.parent / name).unlink()
            except (FileNotFoundError, IsADirectoryError):
                pass


_WRITING: set[str] = set()  # this process's leftover-named paths in use: `settle_output` leaves them alone
_WRITING_LOCK = threading.Lock()
_DEFERRED: list[KeyboardInterrupt] = []  # interrupts `atomic_output_dir` took after its output was in place


def deferred_interrupt() -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that `atomic_output_dir` absorbed since the last call (it came after the output
    had taken OUT's name, so the write succeeded), or None. A caller that goes on after a write (`train`
    between saves) raises it once the write is accounted for, so that the interrupt still stops it."""
    with _WRITING_LOCK:
        taken = _DEFERRED[:1]
        _DEFERRED.clear()
    return taken[0] if taken else None


def _leftover_name(out: Path, kind: str) -> str:
    """`.OUT.KIND-MACHINE-PID`: the name of what `atomic_output_dir` keeps beside OUT (a temporary folder
    adds `-RANDOM`), which says who may settle it (`settle_output`)."""
    return f".{out.name}.{kind}-{_machine()}-{os.getpid()}"


@functools.cache
def _machine() -> str:
    """12 hex digits naming where this process's ids mean something: the host name, the boot (Linux's
    boot_id, new at each boot) and the PID namespace (a container's own). Processes with the same one see
    one another under the same ids; elsewhere (another host or container on a shared folder, the same host
    after a reboot) an id says nothing, so a leftover named with another is never taken for a dead run's."""
    facts = [platform.node()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            facts.append(read())
        except OSError:  # not Linux (or no /proc): the host name alone
            facts.append("")
    return hashlib.sha256("\0".join(facts).encode()).hexdigest()[:12]


def _writing(path: Path, pid: int) -> bool:
    """Whether the leftover-named `path` of this machine's process `pid` may still be written. This process
    knows its own: one it is not writing is what an interrupted removal left (or an earlier process that
    had the same id)."""
    if pid == os.getpid():
        with _WRITING_LOCK:
            return str(path) in _WRITING
    return _alive(pid)


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs here (same `_machine()`; an unknown answer counts as yes: nothing is removed).
    Always unknown on Windows, where `os.kill(pid, 0)` asks nothing: signal 0 is CTRL_C_EVENT there, a
    Ctrl-C sent to the processes of the console."""
    if pid == os.getpid() or sys.platform == "win32":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:  # a file or a link: rmtree would leave it behind
        path.unlink(missing_ok=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2 (glibc 2.28+, Linux), or None: on other systems it is not looked for (the call and
    RENAME_EXCHANGE's value are Linux's; on Windows `ctypes.CDLL(None)` itself raises TypeError)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one atomic step; False where the system or filesystem cannot (then
    nothing changed). Python's os has no such call; renameat2 is Linux 3.15+."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # flag or call unknown here (EPERM: a seccomp filter); the two renames report real errors
    raise OSError(err, os.strerror(err), str(b))


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (links are not followed: what they point at is not the
    output's), so that what is renamed into place next has its data on the disk: without it, a power loss
    soon after the rename can leave the new name pointing at empty or partly written files."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                _fsync(path, folder=False)
        _fsync(root, folder=True)


def sync_path(path: str | Path, folder: bool = False) -> None:
    """fsync a file (or a folder: the names in it) that is about to be, or just was, given its final name."""
    _fsync(path, folder)


def _fsync(path: str | Path, folder: bool) -> None:
    """fsync one file or folder. Folders where the system can open one (not Windows) and only as far as it
    can (some filesystems refuse); a file's fsync error is raised (its data may not be written), unless the
    filesystem has no fsync at all."""
    if folder and os.name == "nt":
        return
    # Windows' fsync (_commit) needs a handle that may write; elsewhere a read-only one does, whatever the modes
    flags = (os.O_RDWR | getattr(os, "O_BINARY", 0)) if os.name == "nt" else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not folder and e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _publish_modes(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors writes 0600 files: give the finished checkpoint the modes
    an ordinary file would get under the user's umask, so a shared or installed copy is readable. Links are
    left as they are: chmod would follow them and change what they point at (a source file's modes)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    (folder / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str = "5GB",
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors as (sharded) safetensors into an existing folder; returns the shard file names."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    names = list(tensors)
    groups = assign_shards([(n, tensors[n].numel() * tensors[n].element_size()) for n in names], limit)
    files = shard_names(len(groups))
    meta = {"format": "pt", **(metadata or {})}
    weight_map = {}
    for file, group in zip(files, groups, strict=True):
        save_file({n: tensors[n].detach().contiguous().cpu() for n in group}, str(folder / file), metadata=meta)
        weight_map.update({n: file for n in group})
    if len(files) > 1:
        write_index(folder, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))
    return files


def write_checkpoint(out: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                     extra_files: Iterable[Path] = (), max_shard_size: int | str = "5GB",
                     force: bool = False) -> Path:
    """A whole checkpoint folder, atomically: config.json, safetensors shards (+ index), copied extra files."""
    out = Path(out)
    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_tensors(tmp, tensors, max_shard_size)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
    return out
