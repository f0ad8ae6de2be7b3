"""Masked-diffusion training of a TwoTower's denoiser (spec §8): the library behind `twotower train`.

Contract
- **Frozen context tower.** `context_tower.*` and `context_lm_head` never require grad, never enter the
  optimizer, and every checkpoint written carries their tensors byte for byte from the source files.
  Trained: the denoiser tower, its `lm_head` and the time conditioning (`train="all"`), or the time
  conditioning alone (`train="time-conditioning"`: `t_embedder`, `t_block`, `scale_shift_tables`).
- **One pass per batch.** `context_pass` runs the context tower once over each clean sequence [B, L] and
  keeps, per layer, what every block's denoiser needs: the K/V of all L positions (`*`), and the Mamba SSM
  and conv states entering each block (`M`, read off the chunked scan at block boundaries; no loop over
  blocks). `BlockDenoiser` then runs the denoiser over all nb = L/S noisy blocks together: block b's
  queries see the context keys of positions < b·S and every key of block b; Mamba layers scan each block
  from its own boundary state ([B, L, H] viewed as [B·nb, S, H]); time conditioning per (sequence, block).
  This equals `TwoTower.denoise`, the sampler's per-block forward, on the same blocks (tests/test_train.py).
- **Noise and loss.** t ~ U[1e-3, 1], once per sequence (spec §8, as NVIDIA trains; `noise_per="block"`:
  once per block); each token is masked with probability its t, at least one per block. The denoiser is conditioned on the realised masked fraction of its block, which is what the
  sampler feeds it (spec §4). Loss: mean cross-entropy over the masked positions, no 1/t weight.
- **Data.** Text files (one document each, read in pieces: `iter_text_ids`) or JSON-lines files (`.jsonl` or
  `.json`, one `{"text": ...}` per line), plain or gzip/bzip2/xz-compressed (`open_data_text`), encoded
  with the checkpoint's tokenizer, joined with EOS between documents, packed into sequences of `seq_len`
  (the tail that does not fill one is dropped). The last 5 % of the sequences (at least 1, at most 64) are
  held out for evaluation; training reads the rest in a fresh seeded permutation every epoch.
- **Memory.** `gradient_checkpointing` keeps only each denoiser layer's input for backward and runs the
  layer again there (`torch.utils.checkpoint`, non-reentrant): the same loss and gradients.
- **Optimisation.** AdamW (betas 0.9/0.95, weight decay 0.01 on matrices), linear warmup then cosine decay
  to 10 % of the peak, gradient-norm clipping at 1.0, gradient accumulation. Trained parameters are fp32
  masters computed in fp32 (with FSDP, `compute_dtype` bf16 casts them for compute; the model's own fp32
  paths, SSD scan, softmax and norms, stay fp32 either way); `dtype` is the frozen context tower's compute
  dtype. Written tensors keep the source checkpoint's dtypes.
- **Determinism.** Which sequences a micro-batch reads and the noise it draws are pure functions of
  (seed, step, slot), slot = micro_step · world_size + rank. So a run stopped at step s and resumed replays
  exactly the uninterrupted run, and 2 DDP ranks with batch b compute what 1 process with batch b and
  grad_accum 2 computes.
- **Checkpoints.** OUT is a TwoTower checkpoint in NVIDIA's layout (config.json with `twotower.block_size`
  set to the training block, safetensors, tokenizer files), replaced atomically every `save_every` steps
  and at the end, with `trainer_state.pt` beside the weights: step, optimizer, settings, data sizes, loss
  history, RNG state and (for non-fp32 checkpoints) the fp32 masters. Only tensors, numbers, strings and
  containers of them: it loads with `torch.load(weights_only=True)`. `resume=True` continues from it.
- **Scale-out.** Under `torchrun` (WORLD_SIZE > 1) the process group comes from the environment (NCCL on
  GPUs, gloo on CPUs), `BlockDenoiser` (the trained part) is wrapped in DDP, the micro-batches are sharded
  by rank and only rank 0 reports and writes. With `fsdp=True` both towers, the gradients and the optimizer
  state are sharded over the ranks instead (`sharded`); the data, noise and results are the same.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import io
import json
import lzma
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from twotower_cli.checkpoint import (
    Checkpoint,
    atomic_output_dir,
    check_output_folder,
    deferred_interrupt,
    open_checkpoint,
    save_tensors,
    scratch_path,
    settle_output,
    settle_scratch,
    short_of_space,
    size_text,
    sync_path,
)
from twotower_cli.config import DEFAULT_BLOCK_SIZE, NemotronHConfig
from twotower_cli.display import finite_json
from twotower_cli.errors import TwoTowerError, check_files, check_seed, describe, not_a_file, out_of_memory
from twotower_cli.hub import AUX_FILE_PATTERNS
from twotower_cli.model.cache import KVCache, MambaState
from twotower_cli.model.derived import no_reuse
from twotower_cli.model.loading import cast_, load_state
from twotower_cli.model.nemotron_h import NemotronHModel
from twotower_cli.text import Tokenizer, json_text
from twotower_cli.towers import TwoTower, is_twotower_checkpoint, layer_modulations

TRAINER_STATE = "trainer_state.pt"
TRAINING_SUMMARY = "training.json"  # step, settings, data and losses, for `twotower inspect` (no torch.load)
STATE_VERSION = 2  # 2: experts stacked per layer (one parameter, one optimizer state)
TRAIN_CHOICES = ("all", "time-conditioning")
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIME_CONDITIONING = ("t_embedder.", "t_block.", "scale_shift_tables.")
FROZEN = ("context_tower.", "context_lm_head.")

T_MIN = 1e-3  # t ~ U[T_MIN, 1] (spec §8)
NOISE_PER = ("sequence", "block")  # what one draw of t covers: spec §8 (NVIDIA) draws it per sequence
EVAL_FRACTION, MAX_EVAL_SEQUENCES = 0.05, 64
BETAS, WEIGHT_DECAY, GRAD_CLIP, MIN_LR_FRACTION = (0.9, 0.95), 0.01, 1.0, 0.1
# A step whose loss or gradient norm is not finite is skipped (the weights and the optimizer state stay as
# they were: one NaN update would make every weight NaN, and every later save would write them); after this
# many in a row the run stops, OUT holding its last save.
NONFINITE_STOP = 10
# Settings that must not change across a resume (the rest, e.g. steps or lr, may).
RESUME_KEYS = ("block", "seq_len", "batch", "grad_accum", "seed", "train", "world_size", "fsdp", "noise_per")
# what a state saved before a setting existed ran with
RESUME_DEFAULTS = {"fsdp": False, "noise_per": "block"}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_EPOCH, _NOISE, _EVAL = 1, 2, 3  # tags that keep derived seeds apart


def check_noise_per(value: str) -> None:
    """A `TwoTowerError` for a --noise-per that is not one of `NOISE_PER` (train, eval)."""
    if value not in NOISE_PER:
        raise TwoTowerError(f"--noise-per {value!r} is not one of {', '.join(NOISE_PER)}",
                            "sequence draws t once per sequence, as NVIDIA trains")


DATA_HINT = "check the --data paths (each names a file)"


def check_data_files(paths: list[Path], hint: str = DATA_HINT, *, pipes: bool = True) -> None:
    """Each of `paths` names a data file (or, with `pipes`, a pipe such as `<(zcat corpus.txt.gz)`, read once):
    checked before a checkpoint is fetched or loaded, so that a wrong path fails in a moment."""
    check_files(paths, "data file", hint, pipes=pipes)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------- data

class Sequences:
    """Sequences of `seq_len` tokens cut from token streams, read when indexed (an index tensor or a slice →
    [k, seq_len] int64). A stream is a 1-D integer array, in memory or memory-mapped from a `.npy` file, so
    a corpus larger than memory trains without being loaded; its tail that does not fill a sequence is
    dropped, and no sequence crosses two streams. Sequences `start` … `stop` - 1 of all of them are this view."""

    def __init__(self, streams: list[np.ndarray], seq_len: int, start: int = 0, stop: int | None = None):
        self.streams, self.seq_len = streams, seq_len
        self.bounds = np.cumsum([0] + [len(s) // seq_len for s in streams])  # first sequence of each stream
        self.start, self.stop = start, int(self.bounds[-1]) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> Sequences:
        return Sequences(self.streams, self.seq_len, self.start + start, self.start + stop)

    def __getitem__(self, index: Tensor | slice) -> Tensor:
        rows = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).reshape(-1)
        L = self.seq_len
        out = np.empty((len(rows), L), dtype=np.int64)
        for j, i in enumerate((rows + self.start).tolist()):
            f = int(np.searchsorted(self.bounds, i, side="right")) - 1
            k = i - int(self.bounds[f])
            out[j] = self.streams[f][k * L:(k + 1) * L]
        return torch.from_numpy(out)


FINGERPRINT_ROWS = 64  # sequences hashed (evenly spaced, first and last among them) to tell two data streams apart


def fingerprint(rows: Sequences | Tensor) -> str:
    """A hash of `FINGERPRINT_ROWS` evenly spaced sequences of `rows` and of their count: resuming on other data
    of the same size (a shuffled or reversed corpus, another shard) was taken, as only the counts were compared.
    A few MB read whatever the corpus's size."""
    import hashlib

    n = len(rows)
    picked = torch.linspace(0, n - 1, min(n, FINGERPRINT_ROWS)).round().long().unique() if n else torch.zeros(0).long()
    h = hashlib.sha256(str(n).encode())
    if n:
        h.update(rows[picked].numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class TokenData:
    train: Sequences  # [N, seq_len] when indexed
    eval: Tensor  # [M, seq_len] int64
    tokens: int  # tokens in the streams before packing
    documents: int | None  # (None for pre-tokenized .npy streams)


TEXT_PIECE_CHARS = 1 << 18  # characters of a plain-text file read at a time (`Tokenizer.encode_stream`)
TEXT_PIECE_BATCH = 16  # pieces encoded together: ~4 M characters, ~0.6 GB of tokenizer memory at a time


# compressed data files are read as they are, by the standard library's decompressors (zstd is not among them
# before Python 3.14: a pipe does, `--data <(zstd -dc corpus.jsonl.zst)`)
DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
NO_DECOMPRESSOR = (".zst", ".zstd")


def data_suffix(path: Path) -> str:
    """A data file's kind by its name, under a compression suffix: corpus.jsonl.gz → .jsonl."""
    path = Path(path)
    return (path.with_suffix("") if path.suffix.lower() in DECOMPRESS else path).suffix.lower()


def open_data_text(path: Path) -> TextIO:
    """A data file as UTF-8 text, without the byte-order mark some Windows tools write first (which is no text,
    and made a JSONL file's line 1 "not valid JSON"), decompressed on the fly where its name says so."""
    return DECOMPRESS.get(Path(path).suffix.lower(), open)(path, "rt", encoding="utf-8-sig")


JSON_LINES = (".jsonl", ".json")  # .json too: datasets often name JSON lines so (read as text, it trained on braces)


def _text_record(line: str) -> bool:
    """Whether a line is a JSON-lines record: an object with a string `text` field."""
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("text"), str)


class _Rewound(io.TextIOBase):
    """A text stream that can be read once (a pipe), with what was read ahead of the reader put back in front."""

    def __init__(self, head: str, rest: TextIO):
        super().__init__()
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        head, self._head = (self._head, "") if size is None or size < 0 else (self._head[:size], self._head[size:])
        return head + (self._rest.read() if size is None or size < 0 else self._rest.read(size - len(head)))

    def __iter__(self) -> Iterator[str]:
        yield from self._head.splitlines(keepends=True)
        self._head = ""
        yield from self._rest

    def close(self) -> None:
        self._rest.close()
        super().close()


SNIFF_CHARS = 1 << 26  # the most of a pipe's first line read to tell JSON lines (a record can be a whole book)


def sniffed_pipe(path: Path) -> tuple[bool, TextIO]:
    """A data pipe (`--data <(zstd -dc corpus.jsonl.zst)`), which has no name to tell its kind by: whether it
    holds JSON lines (its first non-empty line, up to SNIFF_CHARS, is an object with a `text` field), and the
    stream to read it from (the pipe, with what was read to tell put back). Else it is plain text, as a file
    without a JSON suffix is (every pipe was, before: JSON lines trained on their braces and keys)."""
    f = open_data_text(path)
    head = ""
    while (line := f.readline(SNIFF_CHARS)) and not line.strip():
        head += line
    return _text_record(line), _Rewound(head + line, f)


def iter_jsonl_documents(path: Path, stream: TextIO | None = None) -> Iterator[str]:
    """The `text` of each line of a JSON-lines file (or of `stream`, read from it), read a line at a time,
    empty ones skipped."""
    one_per_line = ("a data file in JSON holds one object with a 'text' field per line (an array converts with "
                    f"`jq -c '.[]' {path}`)")
    with stream if stream is not None else open_data_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TwoTowerError(f"{path}:{n} is not valid JSON: {e.msg}", one_per_line) from None
            except RecursionError:
                raise TwoTowerError(f"{path}:{n} is not valid JSON: nested too deep", one_per_line) from None
            if isinstance(obj, list):
                raise TwoTowerError(f"{path}:{n} is a JSON array, not one object", one_per_line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise TwoTowerError(f"{path}:{n} has no string 'text' field", "each line needs one")
            if obj["text"]:
                yield json_text(obj["text"], f"{path}:{n}")  # "\ud800" alone: the tokenizer's bare TypeError


def iter_text_ids(path: Path, tokenizer: Tokenizer, stream: TextIO | None = None) -> Iterator[list[int]]:
    """The ids of a plain-text file (or of `stream`), one document (what `tokenizer.encode` of its whole text
    gives, newlines read as `Path.read_text` reads them; `open_data_text`), in pieces: read `TEXT_PIECE_CHARS`
    characters at a time, never whole (`Tokenizer.encode_stream`)."""
    with stream if stream is not None else open_data_text(path) as f:
        yield from tokenizer.encode_stream(f, TEXT_PIECE_CHARS, TEXT_PIECE_BATCH)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer that holds every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def iter_token_chunks(paths: list[Path], tokenizer: Tokenizer, eos: int | None, dtype: np.dtype, vocab_size: int,
                      batch: int = 1024) -> Iterator[tuple[np.ndarray, int]]:
    """The token stream of the documents (joined with `eos` between them): a text file is one document, a
    JSONL file one per line (its `text`), empty ones skipped. In chunks, with the documents each ends:
    JSONL documents `batch` at a time (`encode_batch`: all cores), a text file in pieces of bounded size
    (`iter_text_ids`), the last of them counting the document. An id past the model's vocabulary (a
    tokenizer that does not belong to the weights) is an error."""
    first = True

    def array(ids: list[int]) -> np.ndarray:
        if max(ids) >= vocab_size:
            raise TwoTowerError(f"the tokenizer produced id {max(ids)} but the model's vocabulary has "
                                f"{vocab_size} entries", "the checkpoint's tokenizer.json does not belong to its weights")
        return np.asarray(ids, dtype=dtype)

    def opening(ids: list[int]) -> list[np.ndarray]:
        """A document's first ids, after EOS unless it opens the stream."""
        nonlocal first
        parts = [array(ids)] if first or eos is None else [np.array([eos], dtype=dtype), array(ids)]
        first = False
        return parts

    def chunk(docs: list[str]) -> tuple[np.ndarray, int]:
        parts, count = [], 0
        for ids in tokenizer.encode_batch(docs):
            if ids:
                parts += opening(ids)
                count += 1
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)), count

    for path in map(Path, paths):
        check_data_files([path])  # files, and pipes (`tokenize --data <(zcat …)`: read once here)
        if path.suffix.lower() in NO_DECOMPRESSOR:
            raise TwoTowerError(f"data file {path} is zstd-compressed, which Python's standard library cannot read "
                                "here", f"decompress it on the fly: --data <(zstd -dc {path})")
        try:
            jsonl, stream = data_suffix(path) in JSON_LINES, None
            if not jsonl and not path.is_file():  # a pipe: what it holds tells its kind
                jsonl, stream = sniffed_pipe(path)
            if jsonl:
                docs: list[str] = []
                for doc in iter_jsonl_documents(path, stream):
                    docs.append(doc)
                    if len(docs) == batch:
                        yield chunk(docs)
                        docs = []
                if docs:
                    yield chunk(docs)
                continue
            held = None  # each piece waits for the next, so that the last one counts the document
            for ids in iter_text_ids(path, tokenizer, stream):
                if not ids:
                    continue
                if held is not None:
                    yield held, 0
                held = array(ids) if held is not None else np.concatenate(opening(ids))
            if held is not None:
                yield held, 1
        except UnicodeDecodeError:
            raise TwoTowerError(f"data file {path} is not UTF-8 text", "pass plain text or JSONL files (.gz, .bz2 "
                                "and .xz ones are read as they are)") from None
        except (OSError, EOFError, lzma.LZMAError) as e:  # a damaged or truncated compressed file
            if path.suffix.lower() not in DECOMPRESS:
                raise
            raise TwoTowerError(f"data file {path} cannot be decompressed as {path.suffix[1:]} ({e})",
                                "check the file (e.g. `gzip -t`), or pass it decompressed") from None


def token_file_meta(path: Path) -> Path:
    """Where `twotower tokenize` describes the .npy it wrote: corpus.npy → corpus.meta.json."""
    return Path(path).with_suffix(".meta.json")


NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file

Warn = Callable[[str, str | None], None]  # (message, hint): a `Warning:` line, the run goes on


def open_token_file(path: Path, vocab_size: int, tokenizer: Tokenizer | None = None,
                    warn: Warn | None = None) -> np.ndarray:
    """A pre-tokenized stream (`twotower tokenize`, or any 1-D integer .npy), memory-mapped and checked; with
    `tokenizer`, a stream whose meta file names another vocabulary is refused (its ids would mean other text),
    and one whose vocabulary cannot be checked (no meta file, or one that records none) is read with
    `warn(message, hint)`. A file that is not a .npy array, or holds Python objects, is refused (numpy
    would offer to unpickle it, which runs code from the file)."""
    path = Path(path)
    if not path.is_file():  # memory-mapped: a pipe will not do
        raise not_a_file(path, "data file", DATA_HINT)
    meta = token_file_meta(path)
    written = None
    if tokenizer is not None and meta.is_file():
        try:
            written = json.loads(meta.read_text()).get("tokenizer")
        except (ValueError, OSError, AttributeError):
            written = None
        if written is not None and written != tokenizer.fingerprint():
            raise TwoTowerError(f"{path} was tokenized with another vocabulary than this checkpoint's ({written} vs "
                                f"{tokenizer.fingerprint()}, from {meta.name})",
                                "tokenize the text again with this checkpoint: `twotower tokenize CKPT --data ...`")
    hint = "write it with `twotower tokenize CKPT --data FILE -o OUT.npy`"
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise TwoTowerError(f"cannot read {path}: {e.strerror or e}", "check the --data paths") from None
    if head != NPY_MAGIC:
        raise TwoTowerError(f"{path} is not a .npy array of token ids (it does not start as .npy files do)", hint)
    try:
        stream = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        if "object" in str(e).lower() or "pickle" in str(e).lower():
            raise TwoTowerError(f"{path} holds an array of Python objects, not token ids (refused: loading it would "
                                "run code from the file)", hint) from None
        raise TwoTowerError(f"cannot read {path} as a .npy array of token ids: {e}", hint) from None
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise TwoTowerError(f"{path} holds a {stream.dtype} array of shape {list(stream.shape)}, not a 1-D array "
                            "of token ids", hint)
    if len(stream) and (int(stream.max()) >= vocab_size or int(stream.min()) < 0):
        raise TwoTowerError(f"{path} holds ids outside the model's vocabulary (0..{vocab_size - 1})",
                            "tokenize it with this checkpoint's tokenizer")
    if tokenizer is not None and written is None and warn is not None:
        why = f"no {meta.name} beside it" if not meta.is_file() else f"{meta.name} records no vocabulary"
        warn(f"{path}: {why}, so its vocabulary could not be checked against this checkpoint's (ids of another "
             "tokenizer would train on other text)", "write it with `twotower tokenize`, which writes the meta file")
    return stream


def token_streams(paths: list[Path], tokenizer: Tokenizer, eos: int | None, vocab_size: int,
                  warn: Warn | None = None) -> tuple[list[np.ndarray], int | None]:
    """The token streams of data files: one per pre-tokenized `.npy` file (memory-mapped), or one for all the
    text and JSONL files (tokenised, documents joined with EOS); and the number of documents (None for .npy)."""
    paths = [Path(p) for p in paths]
    npy = [p for p in paths if p.suffix.lower() == ".npy"]
    if npy and len(npy) != len(paths):
        raise TwoTowerError("--data mixes pre-tokenized .npy files with text", "tokenize the text too "
                            "(`twotower tokenize`), or pass text only")
    if npy:
        return [open_token_file(p, vocab_size, tokenizer, warn) for p in npy], None
    dtype = np.dtype(np.int64)
    chunks = list(iter_token_chunks(paths, tokenizer, eos, dtype, vocab_size))
    stream = np.concatenate([c for c, _ in chunks]) if chunks else np.zeros(0, dtype=dtype)
    return [stream], sum(n for _, n in chunks)


def load_data(paths: list[Path], tokenizer: Tokenizer, seq_len: int, eos: int | None, vocab_size: int,
              eval_paths: list[Path] | None = None, warn: Warn | None = None) -> TokenData:
    """Tokenise (or memory-map pre-tokenized `.npy` streams) and pack. The held-out sequences are those of
    `eval_paths` when given (and all of `paths` is trained on), else the last sequences of `paths`.
    `warn(message, hint)`: a .npy whose vocabulary cannot be checked (`open_token_file`)."""
    if not paths:
        raise TwoTowerError("no data files given", "pass --data FILE (text or JSONL)")
    streams, documents = token_streams(paths, tokenizer, eos, vocab_size, warn)
    n_tokens = sum(len(s) for s in streams)
    if not n_tokens:
        raise TwoTowerError(f"the data ({', '.join(str(p) for p in paths)}) holds no text",
                            "pass files with some text in them")
    seqs = Sequences(streams, seq_len)
    if eval_paths:
        held = Sequences(token_streams(eval_paths, tokenizer, eos, vocab_size, warn)[0], seq_len)
        if not len(seqs) or not len(held):
            which = "--eval-data" if not len(held) else "--data"
            raise TwoTowerError(f"{which} holds fewer tokens than one sequence of --seq-len {seq_len}",
                                "add data or lower --seq-len")
        return TokenData(seqs, held[:], n_tokens, documents)
    if len(seqs) < 2:
        raise TwoTowerError(f"the data holds {n_tokens} tokens, fewer than two sequences of --seq-len {seq_len} "
                            "(one to train on, one to evaluate)", "add data or lower --seq-len")
    n_eval = min(max(1, int(len(seqs) * EVAL_FRACTION)), MAX_EVAL_SEQUENCES)
    return TokenData(seqs.view(0, len(seqs) - n_eval), seqs.view(len(seqs) - n_eval, len(seqs))[:], n_tokens,
                     documents)


def tokenize_to_file(paths: list[Path], tokenizer: Tokenizer, eos: int | None, vocab_size: int, out: Path,
                     progress: Callable[[int, int], None] | None = None) -> tuple[int, int, np.dtype]:
    """The token stream of the documents (as `load_data` builds it) written to `out` as a 1-D .npy array of the
    narrowest dtype, with bounded memory (chunks go to a raw file beside it, then into the .npy), atomically;
    beside it `token_file_meta(out)` records the vocabulary's fingerprint, EOS, counts and sources, which
    `load_data` checks. Returns (tokens, documents, dtype); `progress(documents, tokens)` after each chunk."""
    dtype = token_dtype(vocab_size)
    out = Path(out)
    meta = token_file_meta(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settle_scratch(out, ("raw", "part"))  # what a killed run left (a raw file as large as the stream)
    settle_scratch(meta, ("part",))
    raw, part = scratch_path(out, "raw"), scratch_path(out, "part", ".npy")
    meta_part = scratch_path(meta, "part")
    tokens = documents = 0
    try:
        with open(raw, "wb") as f:
            for ids, n in iter_token_chunks(paths, tokenizer, eos, dtype, vocab_size):
                f.write(ids.tobytes())
                tokens, documents = tokens + len(ids), documents + n
                if progress is not None:
                    progress(documents, tokens)
        if not tokens:
            raise TwoTowerError(f"the data ({', '.join(str(p) for p in paths)}) holds no text",
                                "pass files with some text in them")
        source = np.memmap(raw, dtype=dtype, mode="r", shape=(tokens,))
        target = np.lib.format.open_memmap(part, mode="w+", dtype=dtype, shape=(tokens,))
        step = 1 << 24
        for i in range(0, tokens, step):
            target[i:i + step] = source[i:i + step]
        target.flush()
        del source, target
        meta_part.write_text(json.dumps({"tokenizer": tokenizer.fingerprint(), "vocab_size": vocab_size,
                                         "eos_token_id": eos, "documents": documents, "tokens": tokens,
                                         "dtype": str(dtype), "sources": [str(p) for p in paths]}, indent=2) + "\n")
        for f in (part, meta_part):  # on the disk before their names say they are there
            sync_path(f)
        # Two files cannot change in one step: the old meta goes first, so that an interruption between the
        # steps leaves a stream without a meta file (read unchecked, as any .npy), never one whose meta file
        # describes another stream (another vocabulary's, accepted as this one's).
        meta.unlink(missing_ok=True)
        os.replace(part, out)
        os.replace(meta_part, meta)
        sync_path(out.parent, folder=True)
    finally:
        for f in (raw, part, meta_part):
            f.unlink(missing_ok=True)
    return tokens, documents, dtype


class TrainOrder:
    """The infinite training stream: sample k is sequence perm_e[k mod N] with e = k // N and perm_e a
    permutation seeded by (seed, e). Micro-batch `slot` of optimizer step `step` reads samples
    (step · slots + slot) · batch … + batch - 1."""

    def __init__(self, n: int, seed: int, batch: int, slots: int):
        self.n, self.seed, self.batch, self.slots = n, seed, batch, slots
        self._perms: dict[int, Tensor] = {}

    def permutation(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            gen = torch.Generator().manual_seed(derive_seed(self.seed, _EPOCH, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, step: int, slot: int) -> Tensor:
        first = (step * self.slots + slot) * self.batch
        k = torch.arange(first, first + self.batch)
        return torch.stack([self.permutation(int(i) // self.n)[int(i) % self.n] for i in k])


# ---------------------------------------------------------------------------------------------- noise

def add_noise(ids: Tensor, block: int, mask_id: int, generator: torch.Generator,
              per: str = "sequence") -> tuple[Tensor, Tensor, Tensor]:
    """ids [B, L] (L a multiple of block) → (noisy [B, L], mask [B, L] bool, t [B, L/block]).

    t ~ U[T_MIN, 1], drawn once per sequence (`per="sequence"`, spec §8: "for each example", as NVIDIA
    trains) or once per block (`per="block"`, block diffusion's other choice: each block its own noise
    level); every token is masked with probability its t; the token with the smallest draw of each block
    is masked whatever t is, so no block goes without a target. The returned t is the realised masked
    fraction of each block, the denoiser's conditioning (the sampler's t, spec §4)."""
    B, L = ids.shape
    nb = L // block
    t = T_MIN + (1.0 - T_MIN) * torch.rand(B, nb if per == "block" else 1, 1, generator=generator)
    r = torch.rand(B, nb, block, generator=generator)
    mask = (r < t) | (r == r.min(dim=-1, keepdim=True).values)
    frac = mask.float().mean(dim=-1)
    mask = mask.view(B, L).to(ids.device)
    return ids.masked_fill(mask, mask_id), mask, frac.to(ids.device)


# ---------------------------------------------------------------------------------------------- one-pass forward

@dataclass
class BlockContext:
    """What the context tower hands the denoiser for all blocks of a batch of sequences [B, L]:
    per layer a MambaState of batch B·nb (row i·nb + j: sequence i before block j; zeros for j = 0), the
    KVCache of all L positions [B, kv, L, d] for attention layers, None for E/- layers."""

    layers: list[MambaState | KVCache | None]
    block: int


@torch.no_grad()
def context_pass(tower: NemotronHModel, ids: Tensor, block: int) -> BlockContext:
    """One causal pass of the (frozen) context tower over ids [B, L]. Layers after the last `M`/`*` layer
    cannot change any state, so they are skipped."""
    kinds = tower.cfg.pattern
    last = max((i for i, k in enumerate(kinds) if k in "M*"), default=-1)
    layers: list[MambaState | KVCache | None] = [None] * len(kinds)
    x = tower.embeddings(ids)
    for i in range(last + 1):
        layer = tower.layers[i]
        h = layer.norm(x)
        if layer.kind == "M":
            out, layers[i] = layer.mixer(h, block_size=block)
        elif layer.kind == "*":
            out, k, v = layer.mixer(h)  # causal, no past: flash attention's is_causal on CUDA
            layers[i] = KVCache(k, v)
        else:
            out = layer.mixer(h)
        x = x + out
    return BlockContext(layers, block)


def block_attention_mask(L: int, block: int, device: torch.device | str | None = None) -> Tensor:
    """[L, 2L] bool over [context keys ‖ noisy keys]: query q of block b sees the context keys of positions
    < b·S and all noisy keys of block b (block 0 sees only its own block)."""
    blk = torch.arange(L, device=device) // block
    pos = torch.arange(L, device=device)
    before = pos[None, :] < (blk * block)[:, None]
    same = blk[:, None] == blk[None, :]
    return torch.cat([before, same], dim=1)


class BlockDenoiser(nn.Module):
    """The trained part of a TwoTower (its modules, shared, not copied): the denoiser tower, its head and the
    time conditioning. `forward` is the batched block forward plus the loss; DDP wraps this module."""

    def __init__(self, model: TwoTower, checkpointing: bool = False):
        super().__init__()
        self.denoiser_tower = model.denoiser_tower
        self.lm_head = model.lm_head
        self.t_embedder = model.t_embedder
        self.t_block = model.t_block
        self.scale_shift_tables = model.scale_shift_tables
        # gradient checkpointing: keep only each layer's input; backward runs the layer again
        self.checkpointing = checkpointing

    def hidden(self, noisy: Tensor, t: Tensor, context: BlockContext) -> Tensor:
        """noisy [B, L], t [B, nb] → final hidden states [B, L, H] (after norm_f); spec §5 for every block."""
        tower = self.denoiser_tower
        B, L = noisy.shape
        S = context.block
        nb = L // S
        x = tower.embeddings(noisy).view(B, nb, S, -1)
        e = self.t_block(self.t_embedder(t.reshape(-1))).view(B, nb, 3, -1).float()  # [B, nb, 3, H]
        attn_mask = block_attention_mask(L, S, noisy.device)[None, None]
        mods = layer_modulations(self.scale_shift_tables, e, x.dtype)  # [L, B, nb, 3, 1, H]
        recompute = self.checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(tower.layers):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(self._layer, layer, x, mods[i], context.layers[i], attn_mask,
                                                      use_reentrant=False)
            else:
                x = self._layer(layer, x, mods[i], context.layers[i], attn_mask)
        return tower.norm_f(x).view(B, L, -1)

    @staticmethod
    def _layer(layer: nn.Module, x: Tensor, mod: Tensor, state: MambaState | KVCache | None,
               attn_mask: Tensor) -> Tensor:
        """One denoiser layer over all blocks: x [B, nb, S, H], mod [B, nb, 3, 1, H] → x after the layer."""
        B, nb, S, _ = x.shape
        shift, scale1, gate = mod.unbind(-3)  # each [B, nb, 1, H]; scale1 = 1 + scale
        if layer.kind in "M*":
            h = layer.norm(torch.addcmul(shift, x, scale1))
        else:
            h = torch.addcmul(shift, layer.norm(x), scale1)
        if layer.kind == "M":
            out, _ = layer.mixer(h.reshape(B * nb, S, -1), state=state)
        elif layer.kind == "*":
            out, _, _ = layer.mixer(h.reshape(B, nb * S, -1), past=state, causal=False, mask=attn_mask)
        else:
            out = layer.mixer(h)
        return torch.addcmul(x, gate, out.view(B, nb, S, -1))

    def logits(self, noisy: Tensor, t: Tensor, context: BlockContext) -> Tensor:
        """[B, L, V] fp32; row j predicts the token at position j."""
        return self.lm_head(self.hidden(noisy, t, context)).float()

    def forward(self, noisy: Tensor, t: Tensor, context: BlockContext, targets: Tensor, mask: Tensor,
                reduction: str = "mean") -> Tensor:
        """Cross-entropy over the masked positions (the head runs on those rows only)."""
        h = self.hidden(noisy, t, context)[mask]  # [M, H]
        return F.cross_entropy(self.lm_head(h).float(), targets[mask], reduction=reduction)


# ---------------------------------------------------------------------------------------------- settings, events

@dataclass
class TrainConfig:
    checkpoint: str | Path
    data: list[Path]
    out: Path
    block: int | None = None  # None: the checkpoint's `twotower.block_size` (16 where none is recorded)
    seq_len: int = 512
    batch: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    steps: int = 1000
    warmup: int | None = None  # None: min(100, steps // 10)
    seed: int = 0
    eval_every: int = 100  # 0: only before and after
    save_every: int = 500  # 0: only at the end
    resume: bool = False
    force: bool = False
    train: str = "all"
    device: str | None = None
    dtype: str = "auto"
    stop_after: int | None = None  # stop (and save) after this step of the `steps` schedule
    fsdp: bool = False  # shard both towers, gradients and optimizer state over the ranks (`sharded`)
    gradient_checkpointing: bool = False  # recompute each denoiser layer in backward instead of keeping it
    compute_dtype: str = "fp32"  # the trained part's compute dtype (fp32 masters either way); bf16 needs fsdp
    noise_per: str = "sequence"  # one draw of the noise level t per sequence (spec §8) or per block
    eval_data: list[Path] = field(default_factory=list)  # held-out files (default: the last 5 % of `data`)

    @property
    def warmup_steps(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup

    def validate(self, block_from: str | None = None) -> None:
        """Refuse settings that cannot run. `block_from` names where `block` came from when the user did
        not give it (the checkpoint's config), for the error that --seq-len is not a multiple of it; with
        `block` None (not known yet) the checks on it wait for the call that knows it."""
        def positive(name: str, value: int | float) -> None:
            if not 0 < value < math.inf:  # NaN too
                what = "finite" if value == math.inf else "positive"
                default = {f.name: f.default for f in dataclasses.fields(self)}.get(name)
                raise TwoTowerError(f"--{name.replace('_', '-')} must be {what}, not {value}",
                                    f"leave it out for {default}" if isinstance(default, int | float)
                                    else "leave it out for the checkpoint's block size")

        if self.resume and self.force:
            raise TwoTowerError("--resume and --force conflict: --resume continues the training saved in OUT, "
                                "--force starts over and replaces OUT",
                                "pass --resume to continue, or --force to start over, not both")
        for name in ("seq_len", "batch", "grad_accum", "steps", "lr"):
            positive(name, getattr(self, name))
        if self.block is not None:
            positive("block", self.block)
            if self.seq_len % self.block:
                what = f"--block {self.block}" if block_from is None else f"the block size {self.block} ({block_from})"
                raise TwoTowerError(f"--seq-len {self.seq_len} is not a multiple of {what}",
                                    f"use e.g. --seq-len {max(1, self.seq_len // self.block) * self.block}"
                                    + ("" if block_from is None else ", or pass --block"))
        check_seed(self.seed)
        for name in ("eval_every", "save_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise TwoTowerError(f"--{name.split('_steps')[0].replace('_', '-')} must not be negative",
                                    "0 turns it off" if name != "warmup_steps" else "0: no warm-up")
        if self.train not in TRAIN_CHOICES:
            raise TwoTowerError(f"--train {self.train!r} is not one of {', '.join(TRAIN_CHOICES)}",
                                "leave it out to train the whole denoiser (all)")
        check_noise_per(self.noise_per)
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise TwoTowerError(f"--stop-after {self.stop_after} is not between 1 and --steps {self.steps}",
                                "stop after a step of the schedule, or leave it out to run all of it")
        if not self.data:
            raise TwoTowerError("no data files given", "pass --data FILE (text or JSONL)")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise TwoTowerError(f"--compute-dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}",
                                "leave it out for fp32 (bf16 needs --fsdp)")
        if self.compute_dtype != "fp32" and not self.fsdp:
            raise TwoTowerError(f"--compute-dtype {self.compute_dtype} casts parameters as FSDP gathers them",
                                "add --fsdp (under torchrun; one process is fine: --nproc_per_node 1)")


@dataclass
class Started:
    start_step: int
    stop_step: int
    total_steps: int
    trainable_parameters: int
    frozen_parameters: int
    train_sequences: int
    eval_sequences: int
    tokens_per_step: int
    world_size: int
    device: str


@dataclass
class StepDone:
    step: int  # optimizer steps done (1-based)
    loss: float
    lr: float
    tokens: int  # tokens trained on in this invocation
    seconds: float  # spent in optimizer steps by this invocation


@dataclass
class Evaluated:
    step: int
    loss: float


@dataclass
class Saved:
    step: int
    path: Path


@dataclass
class Warned:
    """Something the run goes on despite (a `Warning:` line), e.g. a .npy whose vocabulary cannot be checked."""
    message: str
    hint: str | None = None


Event = Started | StepDone | Evaluated | Saved | Warned


@dataclass
class TrainResult:
    """What a run did. This invocation's numbers (a resumed run's, from `start_step`): `tokens`,
    `train_seconds`, `tokens_per_second` = tokens / train_seconds (training throughput: time in optimizer
    steps, no loading, evaluation or saving), `seconds` (its wall time, all of that included). The whole
    run's, across resumes: `steps`, `total_tokens`, the losses."""
    steps: int  # optimizer steps done in total (across resumes)
    tokens: int  # tokens trained on by this invocation
    total_tokens: int  # tokens trained on in total (across resumes): steps × tokens per step
    first_loss: float
    final_loss: float
    eval_loss_before: float
    eval_loss_after: float
    seconds: float  # wall time of this invocation (loading, evaluations and saves included)
    train_seconds: float  # time this invocation spent in optimizer steps
    tokens_per_second: float  # tokens / train_seconds (0 when no step ran)
    start_step: int
    out: Path
    skipped_steps: int = 0  # steps whose loss or gradients were not finite, not applied (across resumes)
    losses: list[float] = field(default_factory=list)  # per step of this invocation
    is_main: bool = True  # rank 0 (the process that reports and writes)

    def to_json(self) -> dict[str, Any]:
        """The `--json` object: JSON has no NaN (a run that diverged, a loss never measured): null, as in
        training.json."""
        d = asdict(self)
        d["out"] = str(self.out)
        del d["losses"], d["is_main"]
        return finite_json(d)


def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup over `warmup` steps, then cosine decay to
    MIN_LR_FRACTION · peak at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------- loading, saving

def open_twotower(path: str | Path) -> tuple[Path, Checkpoint, NemotronHConfig]:
    """A local TwoTower checkpoint folder (paths, embedded names and hub ids through hub.resolve). A hub model
    not in the cache is checked from its headers first (`remote.header_folder`): no download for a model that
    is no TwoTower."""
    from twotower_cli.hub import local_or_hub, resolve

    if (repo_id := local_or_hub(str(path))[1]) is not None:
        from twotower_cli.remote import NOT_DOWNLOADED, header_folder

        with header_folder(repo_id, as_path=repo_id == str(path), note=NOT_DOWNLOADED) as (folder, got):
            _twotower_at(folder, got.file_sizes)
    folder = resolve(path)
    if folder.is_file():
        folder = folder.parent
    return (folder, *_twotower_at(folder))


def _twotower_at(folder: Path, file_sizes: dict[str, int] | None = None) -> tuple[Checkpoint, NemotronHConfig]:
    ckpt = open_checkpoint(folder, file_sizes=file_sizes)
    if ckpt.config_raw is None:
        raise TwoTowerError(f"no config.json in {folder}", "a checkpoint folder needs config.json beside its weights")
    cfg = NemotronHConfig.from_dict(ckpt.config_raw)
    if not is_twotower_checkpoint(ckpt):
        raise TwoTowerError(f"{folder} is not a TwoTower checkpoint (no denoiser_tower.* tensors)",
                            "turn a NemotronH checkpoint into one with `twotower split`")
    return ckpt, cfg


def recorded_block(cfg: NemotronHConfig, folder: Path) -> tuple[int, str]:
    """The block a checkpoint records (`twotower.block_size` in config.json, written by `split --block-size`
    and `train --block`), else DEFAULT_BLOCK_SIZE; and where it came from, for messages."""
    value = cfg.twotower.get("block_size")
    where = folder / "config.json"
    if value is None:
        return DEFAULT_BLOCK_SIZE, f"the default: {where} records no twotower.block_size"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TwoTowerError(f"twotower.block_size in {where} is {value!r}, not a positive integer",
                            "pass --block")
    return value, f"twotower.block_size in {where}"


def trained_prefixes(train: str) -> tuple[str, ...]:
    return TIME_CONDITIONING if train == "time-conditioning" else ("denoiser_tower.", "lm_head.", *TIME_CONDITIONING)


def trainable_names(model: TwoTower, train: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(trained_prefixes(train))]


def load_for_training(ckpt: Checkpoint, cfg: NemotronHConfig, train: str, device: torch.device,
                      context_dtype: torch.dtype) -> TwoTower:
    """The TwoTower on `device`: trained parameters fp32 and requiring grad, everything else frozen, the
    context tower (and its head) in `context_dtype` (the spec's fp32 parameters stay fp32)."""
    with torch.device("meta"):
        model = TwoTower(cfg)
    load_state(model, ckpt, dtype=torch.float32, device=device)
    cast_(model.context_tower, context_dtype)
    cast_(model.context_lm_head, context_dtype)
    model.requires_grad_(False)
    names = set(trainable_names(model, train))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model.train()


def checkpoint_tensors(model: TwoTower, source: Checkpoint) -> dict[str, Tensor]:
    """The tensors to write: frozen ones read back from the source files (bytes unchanged), the others from
    the model, cast to the dtype each has in the source checkpoint."""
    default = _SAFETENSORS_DTYPES.get(source.tensors["lm_head.weight"].dtype, torch.float32)
    frozen = [n for n in model.state_dict() if n.startswith(FROZEN) and n in source.tensors]
    out = dict(source.iter_tensors(frozen))
    for name, t in model.state_dict().items():
        if name not in out:
            info = source.tensors.get(name)
            dtype = _SAFETENSORS_DTYPES.get(info.dtype, default) if info is not None else default
            out[name] = t.detach().to("cpu", dtype)
            # fp16 is the one save dtype narrower in range than the fp32 masters: Inf there is a save refused
            if dtype == torch.float16 and not bool(out[name].isfinite().all()) and bool(t.isfinite().all()):
                raise OutOfRange(f"the trained {name} has values beyond fp16's range (±65,504), which the "
                                 "checkpoint's fp16 would hold as Inf")
    return out


class OutOfRange(TwoTowerError):
    """A trained weight that the checkpoint's dtype cannot hold (`checkpoint_tensors`); `train` says which
    step and what OUT holds."""


def save_checkpoint(out: Path, model: TwoTower, source_folder: Path, config: dict[str, Any],
                    state: dict[str, Any], also: Callable[[Path], None] | None = None) -> None:
    """OUT, atomically: config.json, safetensors, tokenizer files and trainer_state.pt; `also(folder)` adds
    more to the folder that replaces OUT."""
    source = open_checkpoint(source_folder)  # opened afresh: on resume the source is OUT itself
    tensors = checkpoint_tensors(model, source)
    aux = [source_folder / f for f in AUX_FILE_PATTERNS if (source_folder / f).is_file()]
    with atomic_output_dir(out, force=True) as tmp:
        if also is not None:
            also(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_tensors(tmp, tensors)
        for f in aux:
            shutil.copy2(f, tmp / f.name)
        torch.save(state, tmp / TRAINER_STATE)
        (tmp / TRAINING_SUMMARY).write_text(json.dumps(training_summary(state), indent=2) + "\n")


def _short_of_space(cfg: TrainConfig, start: int, stop: int, weight_bytes: int,
                    params: list[tuple[str, nn.Parameter]], lossy: bool) -> Warned | None:
    """A warning when OUT's disk cannot hold the saves: each is the weights (`weight_bytes`, both towers as the
    source holds them) plus the optimizer state (AdamW's two fp32 moments, and the fp32 masters when the weights
    are narrower) in trainer_state.pt, and a save that replaces an earlier one writes the new folder beside the
    old, so both are on disk at once. A save that fills the disk fails, and the run stops there."""
    trained = sum(p.numel() for _, p in params)
    save = weight_bytes + trained * (8 + 4 * lossy)
    out = Path(cfg.out)
    replacing = out.exists() or bool(cfg.save_every and start + cfg.save_every < stop)
    short = short_of_space([(save * (1 + replacing), out, "")])
    if not short:
        return None
    return Warned(f"each save writes about {size_text(save)} beside {out}"
                  + (" (the new one beside the previous one until it is complete)" if replacing else "")
                  + f", and that disk has {size_text(short[0][2])} free",
                  "free some space or choose another -o: a save that fills the disk fails and the run stops "
                  f"there{', OUT keeping the save before' if replacing else ''}")


def training_summary(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a trainer state worth showing without loading it: step, settings, data sizes, losses
    (NaN written as null)."""
    return finite_json({"step": state["step"], "settings": state["settings"], "data": state["data"],
                        "history": state["history"]})


def load_trainer_state(out: Path) -> dict[str, Any]:
    path = out / TRAINER_STATE
    if not path.is_file():
        raise TwoTowerError(f"{out} has no {TRAINER_STATE}, so there is nothing to resume",
                            "point -o at a folder written by `twotower train`, or pass --force to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch's text is paragraphs, with advice to load it
        # unsafely (weights_only=False) that is not for a state this command wrote
        raise TwoTowerError(f"cannot read {path}: not a trainer state torch can load ({type(e).__name__})",
                            "the file may be truncated or corrupt; pass --force to start over") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TwoTowerError(f"{path} is not a trainer state this version understands", "pass --force to start over")
    return state


def make_optimizer(params: list[tuple[str, nn.Parameter]], lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (not on norms, biases, or the modulation tables, which are
    gains around 1 and 0)."""
    def decays(name: str, p: nn.Parameter) -> bool:
        return p.ndim >= 2 and not name.startswith("scale_shift_tables.")

    return torch.optim.AdamW([{"params": [p for n, p in params if decays(n, p)], "weight_decay": WEIGHT_DECAY},
                              {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}],
                             lr=lr, betas=BETAS)


# ---------------------------------------------------------------------------------------------- distribution

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    created: bool  # we initialised the process group (and destroy it at the end)
    training: bool = False  # past the checks every rank makes alike: loading, steps, evaluations, saves
    saved: int | None = None  # the step OUT last received (on every rank: a save is collective)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class Diverged(TwoTowerError):
    """The loss was not finite for NONFINITE_STOP steps in a row. Every rank sees the same (all-reduced)
    losses, so rank 0 alone says it."""


class OtherRankReports(Exception):
    """Raised on a rank other than 0 of a `torchrun` job in place of an error that rank 0 reports too (an
    interrupt, which every rank receives; a check of the options, the data or OUT, which every rank makes on
    the same files): the command exits with 1 and prints nothing, so the job says it once."""


def job_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a `torchrun` job, (0, 1) outside one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def _peer_lost(e: BaseException) -> bool:
    """A collective failed because another process of the job ended (gloo: the connection closed; NCCL: a
    backend error, the job aborted)."""
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "remote worker crashing"))


TRAIN_OUT_OF_MEMORY_HINT = "try a smaller --batch or --seq-len, or --gradient-checkpointing"


def _check_same_data(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume on data other than the saved run's, naming what differs (train or held-out data, as
    counts or as content) with both values. A state saved before fingerprints were recorded is held to the
    counts it has."""
    for key, what in (("train_sequences", "training sequences"), ("tokens", "tokens of the data"),
                      ("train_fingerprint", "training data"), ("eval_sequences", "held-out sequences"),
                      ("eval_fingerprint", "held-out data")):
        if key in saved and saved[key] != now[key]:
            said = ("differs from the saved run's (as many sequences, other tokens)" if key.endswith("fingerprint")
                    else f"number {now[key]:,}, the saved run's {saved[key]:,}")
            raise TwoTowerError(f"cannot resume: the {what} {said}",
                                "resume with the saved run's --data and --eval-data files (without --eval-data the "
                                "last 5 % of --data is held out), or --force to start over")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (symlinks followed; False where either is missing)."""
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve() and Path(a).exists()
    except OSError:
        return False


def check_log_file(log: Path, checkpoint: str | Path | None, data: list[Path], eval_data: list[Path]) -> None:
    """Refuse a `--log` the run reads: a --data or --eval-data file (or the .meta.json beside a .npy), or a
    file inside the checkpoint being trained. The log is appended to, so each of those was changed: the
    corpus then held the log's lines (and --resume refused it as other data), the checkpoint's config.json
    no longer read as JSON. Paths are compared resolved (symlinks followed)."""
    target = Path(log).expanduser().resolve()
    for what, paths in (("--data", data), ("--eval-data", eval_data)):
        for path in paths:
            for read in (Path(path), token_file_meta(path)):
                if same_file(read, log):
                    raise TwoTowerError(f"--log {log} is {'the' if read == Path(path) else 'the .meta.json of the'} "
                                        f"{what} file {path}: the log is appended to, so training would change "
                                        "what it reads", "log to a file of its own, e.g. --log train.jsonl")
    local = Path(str(checkpoint)).expanduser() if checkpoint is not None else None
    if local is not None and local.is_dir() and local.resolve() in target.parents:
        raise TwoTowerError(f"--log {log} lies inside the checkpoint {checkpoint}, which training reads: the log "
                            "would change it", "log to a file outside the checkpoint, e.g. --log train.jsonl")


def _job_error(e: BaseException, rank: int, world: int, env: Dist | None, out: Path) -> BaseException:
    """What a rank of a `torchrun` job raises for `e`, so that the job prints one `Error:` line per cause:
    rank 0 alone reports an interrupt and a check every rank makes alike; an error of one rank's own (out of
    memory, a failed write) is said by that rank, with its rank; a collective broken by another rank's end
    is said by rank 0 alone (with the step OUT holds), instead of the transport's message."""
    started = env is not None and env.training
    if isinstance(e, KeyboardInterrupt):
        return e if rank == 0 else OtherRankReports()
    if _peer_lost(e):
        if rank != 0:  # rank 0 says it (with the step OUT holds), and the rank that failed says why
            return OtherRankReports()
        saved = env.saved if env is not None else None
        return TwoTowerError("stopped: another process of the job ended (interrupted, or failed: then its Error "
                             "line says why)" + (f"; {out} holds step {saved}" if saved is not None else ""),
                             "continue with the same command and --resume" if saved is not None else
                             "torchrun's report names the process that ended first")
    if isinstance(e, TwoTowerError) and (not started or isinstance(e, Diverged)):
        return e if rank == 0 else OtherRankReports()
    message, hint = describe(e)  # this rank's own error, said as the CLI says it, with its rank
    if out_of_memory(e):
        hint = TRAIN_OUT_OF_MEMORY_HINT
    return TwoTowerError(f"rank {rank} of {world}: {message}", hint)


def setup_distributed(device: str | None, fsdp: bool = False) -> Dist:
    """One process per rank under torchrun (WORLD_SIZE > 1, or any size with `fsdp`, whose device mesh needs
    a process group): NCCL and cuda:LOCAL_RANK on GPUs, gloo on CPUs."""
    from twotower_cli.runtime import pick_device

    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not fsdp:
        return Dist(0, 1, dev, False)
    if "RANK" not in os.environ:
        raise TwoTowerError("--fsdp shards the model over the processes torchrun starts, and this is a plain process",
                            "run `torchrun --nproc_per_node N -m twotower_cli train ... --fsdp` (one process per "
                            "GPU), or leave out --fsdp")
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev, created)


# ---------------------------------------------------------------------------------------------- training

def train(cfg: TrainConfig, on_event: Callable[[Event], None] | None = None) -> TrainResult:
    """Train the denoiser as `cfg` says; `on_event` (rank 0 only) sees progress. See the module docstring.
    Under `torchrun`, errors are raised so that the job reports each cause once (`_job_error`)."""
    began = time.perf_counter()
    rank, world = job_rank()
    job: list[Dist] = []  # this process's place in the job, once set up
    try:
        return _train_checked(cfg, began, job, on_event)
    except BaseException as e:
        if isinstance(e, SystemExit) or os.environ.get("TWOTOWER_DEBUG") == "1":
            raise
        if world == 1:
            if out_of_memory(e) and not isinstance(e, TwoTowerError):
                raise TwoTowerError(describe(e)[0], TRAIN_OUT_OF_MEMORY_HINT) from e
            raise
        mapped = _job_error(e, rank, world, job[0] if job else None, Path(cfg.out))
        if mapped is e:
            raise
        raise mapped from e


def _train_checked(cfg: TrainConfig, began: float, job: list[Dist],
                   on_event: Callable[[Event], None] | None) -> TrainResult:
    cfg.validate()
    out = Path(cfg.out)
    # Every save replaces OUT whole: refuse an OUT that is or holds the checkpoint being trained (unless
    # resuming, whose source is OUT), holds the current folder or a data file, or lies inside the checkpoint.
    # First on the paths as given (nothing is touched before), then on the folder a hub id resolves to.
    local = Path(str(cfg.checkpoint)).expanduser()
    local = (local.parent if local.is_file() else local) if local.exists() else None
    inputs = [*(("--data file", p) for p in cfg.data), *(("--eval-data file", p) for p in cfg.eval_data)]
    check_output_folder(out, local, may_be_source=cfg.resume, inputs=inputs)
    settle_output(out)  # a run killed while replacing OUT may have left the previous OUT aside: put it back
    resuming = cfg.resume and out.exists()
    if out.exists() and not (cfg.resume or cfg.force):
        raise TwoTowerError(f"{out} already exists", "pass --resume to continue the training saved there, "
                            "or --force to replace it")
    if resuming and local is not None and out.resolve() == local.resolve() and not (out / TRAINER_STATE).is_file():
        raise TwoTowerError(f"{out} is the checkpoint given to train and holds no {TRAINER_STATE}, so there is "
                            "nothing to resume", "write to another -o (it must not be the checkpoint itself)")
    state = load_trainer_state(out) if resuming else None
    # a pipe (`--data <(zcat corpus.txt.gz)`) is read once: by one process, not by each rank of a torchrun job
    alone = job_rank()[1] == 1
    check_data_files([*cfg.data, *cfg.eval_data], "check the --data and --eval-data paths (each names a file)"
                     if alone else "each rank reads the data: write it to a file first", pipes=alone)
    source_folder, _, mcfg = open_twotower(out if resuming else cfg.checkpoint)
    if not resuming:
        check_output_folder(out, source_folder, inputs=inputs)
    saved_warmup = state["settings"].get("warmup") if state is not None else None
    if cfg.warmup is None and saved_warmup is not None:  # resumed without --warmup: the run's own warmup, not
        cfg = dataclasses.replace(cfg, warmup=int(saved_warmup))  # the default recomputed from this call's --steps
    if cfg.block is None:  # the block the checkpoint was split or trained with (on resume: OUT's, the run's own)
        block, origin = recorded_block(mcfg, source_folder)
        cfg = dataclasses.replace(cfg, block=block)
        cfg.validate(origin)
    env = setup_distributed(cfg.device, cfg.fsdp)
    job.append(env)
    try:
        with no_reuse() if cfg.fsdp else contextlib.nullcontext():  # see model.derived
            return _train(cfg, env, source_folder, mcfg, state, on_event if env.is_main else None, began)
    finally:
        if env.created:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: Dist, source_folder: Path, mcfg: NemotronHConfig, state: dict[str, Any] | None,
           on_event: Callable[[Event], None] | None, began: float) -> TrainResult:
    from twotower_cli.runtime import pick_dtype

    emit = on_event or (lambda ev: None)
    device = env.device
    tokenizer = Tokenizer(source_folder)
    eos = mcfg.eos_token_ids[0] if mcfg.eos_token_ids else None
    data = load_data([Path(p) for p in cfg.data], tokenizer, cfg.seq_len, eos, mcfg.vocab_size,
                     [Path(p) for p in cfg.eval_data], warn=lambda message, hint: emit(Warned(message, hint)))
    settings = {"block": cfg.block, "seq_len": cfg.seq_len, "batch": cfg.batch, "grad_accum": cfg.grad_accum,
                "seed": cfg.seed, "train": cfg.train, "world_size": env.world, "fsdp": cfg.fsdp, "lr": cfg.lr,
                "steps": cfg.steps, "warmup": cfg.warmup_steps, "source": str(cfg.checkpoint),
                "compute_dtype": cfg.compute_dtype, "noise_per": cfg.noise_per}
    data_sizes = {"train_sequences": len(data.train), "eval_sequences": len(data.eval), "tokens": data.tokens,
                  "train_fingerprint": fingerprint(data.train), "eval_fingerprint": fingerprint(data.eval)}
    if state is not None:
        for key in RESUME_KEYS:
            saved = state["settings"].get(key, RESUME_DEFAULTS.get(key))
            if saved != settings[key]:
                raise TwoTowerError(f"cannot resume: {key} is {settings[key]} but the saved run used {saved}",
                                    "resume with the same settings, or --force")
        _check_same_data(state["data"], data_sizes)
        saved_source = state["settings"].get("source")
        if saved_source is not None and saved_source != settings["source"]:  # OUT is what resumes, not CKPT
            emit(Warned(f"resuming {cfg.out}, trained from {saved_source}: the checkpoint given, {cfg.checkpoint}, "
                        "is not read", f"the run goes on from {cfg.out}'s own weights"))
            settings["source"] = saved_source  # the record keeps the run's source
    # From here on an error may be this rank's own (`_job_error`), a TwoTowerError too: the load's memory
    # check looks at this rank's GPU, which another job may fill on one rank only.
    env.training = True

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    source = open_checkpoint(source_folder)
    context_dtype = pick_dtype(cfg.dtype, device)
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        from twotower_cli import sharded

        mesh = init_device_mesh(device.type, (env.world,))
        with torch.device("meta"):
            names = set(trainable_names(TwoTower(mcfg), cfg.train))
        model, denoiser, context_net = sharded.load_sharded(source, mcfg, names, mesh, context_dtype,
                                                            COMPUTE_DTYPES[cfg.compute_dtype])
        denoiser.checkpointing = cfg.gradient_checkpointing

        def contexts(ids: Tensor) -> BlockContext:
            return context_net(ids, cfg.block)
    else:
        model = load_for_training(source, mcfg, cfg.train, device, context_dtype)
        denoiser = BlockDenoiser(model, cfg.gradient_checkpointing)

        def contexts(ids: Tensor) -> BlockContext:
            return context_pass(model.context_tower, ids, cfg.block)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.lr)
    net: nn.Module = denoiser
    if env.world > 1 and not cfg.fsdp:
        # Every trained parameter gets a gradient each step (the experts are stacked per layer: an expert no
        # token chose gets zero rows), so DDP need not search the graph for unused ones.
        net = nn.parallel.DistributedDataParallel(denoiser)

    start, history = 0, {"first_loss": math.nan, "eval_loss_before": math.nan}
    stop = cfg.stop_after or cfg.steps
    if state is not None:
        start, history = int(state["step"]), dict(state["history"])
        if start > stop:
            raise TwoTowerError(f"{cfg.out} is already at step {start}, past the {stop} asked for",
                                "raise --steps (or --stop-after), or pass --force to start over")
        if cfg.fsdp:
            sharded.load_shards(source_folder, denoiser, opt)
        else:
            opt.load_state_dict(state["optimizer"])
            with torch.no_grad():
                for n, p in params:
                    if n in state.get("master", {}):
                        p.copy_(state["master"][n])
        torch.set_rng_state(state["rng"]["torch"])
    slots = cfg.grad_accum * env.world
    order = TrainOrder(len(data.train), cfg.seed, cfg.batch, slots)
    tokens_per_step = cfg.batch * slots * cfg.seq_len
    mask_id = mcfg.mask_token_id
    config = mcfg.to_dict()
    config["twotower"] = {**mcfg.twotower, "block_size": cfg.block}
    # Written weights rounded to a narrower dtype need their fp32 masters in the state for an exact resume.
    # (Names of the checkpoint's layout: stacked experts are one parameter but a tensor per expert there.)
    trained = trained_prefixes(cfg.train)
    lossy = any(info.dtype != "F32" for n, info in source.tensors.items() if n.startswith(trained))

    def evaluate() -> float:
        return _evaluate(denoiser, contexts, data.eval, cfg, mask_id, env)

    def save(step: int) -> None:
        trainer_state = {"version": STATE_VERSION, "step": step, "settings": settings, "data": data_sizes,
                         "history": history, "rng": {"torch": torch.get_rng_state()}}
        try:
            if cfg.fsdp:  # weights gathered to rank 0; optimizer state and masters written sharded, by every rank
                shadow = sharded.gather(denoiser, mcfg, source, env.is_main)
                if env.is_main:
                    save_checkpoint(Path(cfg.out), shadow, source_folder, config, trainer_state,
                                    also=lambda tmp: sharded.save_shards(tmp, denoiser, opt))
                    emit(Saved(step, Path(cfg.out)))
                else:
                    sharded.save_shards(None, denoiser, opt)
                del shadow
            elif env.is_main:
                trainer_state["optimizer"] = opt.state_dict()
                if lossy:
                    trainer_state["master"] = {n: p.detach().cpu() for n, p in params}
                save_checkpoint(Path(cfg.out), model, source_folder, config, trainer_state)
                emit(Saved(step, Path(cfg.out)))
        except OutOfRange as e:  # nothing of this save was written: OUT is as the last save left it
            held = f"{cfg.out} holds step {env.saved}" if env.saved is not None else f"nothing was saved to {cfg.out}"
            raise TwoTowerError(f"step {step}: {e.message}; the save was not written, so {held}",
                                "lower --lr or raise --warmup, or train a bf16 checkpoint (`twotower split --dtype "
                                "bf16`)") from None
        env.barrier()
        env.saved = step
        if (interrupt := deferred_interrupt()) is not None:  # it came as the save's old output was removed:
            raise interrupt  # the save is done (and said), and the interrupt still stops the run

    if env.is_main and (short := _short_of_space(cfg, start, stop, source.total_bytes, params, lossy)):
        emit(short)
    if cfg.warmup is not None and cfg.warmup >= cfg.steps:  # said after the checks: a refused run prints one Error
        emit(Warned(f"--warmup {cfg.warmup} is not below --steps {cfg.steps}: the learning rate "
                    + (f"reaches --lr {cfg.lr:g} only at the last step and never decays" if cfg.warmup == cfg.steps
                       else f"never reaches --lr {cfg.lr:g} (it peaks at {cfg.lr * cfg.steps / cfg.warmup:.3g})"),
                    f"use a --warmup below --steps, e.g. --warmup {min(100, cfg.steps // 10)}"))
    emit(Started(start, stop, cfg.steps, sum(p.numel() for _, p in params),
                 sum(p.numel() for p in model.parameters() if not p.requires_grad),
                 len(data.train), len(data.eval), tokens_per_step, env.world, str(device)))
    if state is None:
        history["eval_loss_before"] = evaluate()
        emit(Evaluated(0, history["eval_loss_before"]))
    eval_loss = history.get("eval_loss_after", history["eval_loss_before"])
    losses: list[float] = []
    train_seconds = 0.0  # in optimizer steps only (no evaluation, no saving)
    last_eval = start
    nonfinite, warned_nonfinite = 0, False  # skipped steps in a row; said once a run
    for step in range(start, stop):
        t_step = time.perf_counter()
        lr = learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(cfg.grad_accum):
            slot = micro * env.world + env.rank
            ids = data.train[order.indices(step, slot)]
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _NOISE, step, slot))
            noisy, mask, t = add_noise(ids, cfg.block, mask_id, gen, cfg.noise_per)
            ids, noisy, mask, t = ids.to(device), noisy.to(device), mask.to(device), t.to(device)
            context = contexts(ids)
            last_micro = micro == cfg.grad_accum - 1
            ddp = env.world > 1 and not cfg.fsdp
            sync = net.no_sync() if (ddp and not last_micro) else contextlib.nullcontext()
            with sync:
                loss = net(noisy, t, context, ids, mask)
                (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], GRAD_CLIP)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        loss_value, bad_norms = env.all_sum(total / env.world, float(not torch.isfinite(norm)))
        if math.isfinite(loss_value) and not bad_norms:
            opt.step()
            nonfinite = 0
        else:  # skipped: weights and optimizer state unchanged (the schedule and the data order go on)
            nonfinite += 1
            history["skipped_steps"] = history.get("skipped_steps", 0) + 1
            if nonfinite == 1 and not warned_nonfinite:
                warned_nonfinite = True
                what = f"the loss is {loss_value}" if not math.isfinite(loss_value) else "the gradients are not finite"
                emit(Warned(f"step {step + 1}: {what}: the step is skipped (the weights stay as they were); "
                            f"training stops after {NONFINITE_STOP} such steps in a row",
                            "lower --lr, or raise --warmup"))
            if nonfinite == NONFINITE_STOP:
                raise Diverged(
                    f"training diverged: the loss or gradients were not finite for {NONFINITE_STOP} steps in a row "
                    f"(steps {step + 2 - NONFINITE_STOP}–{step + 1}, all skipped); "
                    + (f"{cfg.out} holds step {env.saved}" if env.saved is not None
                       else f"nothing was saved to {cfg.out}"),
                    "lower --lr or raise --warmup" + (", then continue with --resume" if env.saved is not None
                                                      else ""))
        opt.zero_grad(set_to_none=True)
        losses.append(loss_value)
        if step == 0:
            history["first_loss"] = loss_value
        history["final_loss"] = loss_value
        done = step + 1
        train_seconds += time.perf_counter() - t_step
        emit(StepDone(done, loss_value, lr, (done - start) * tokens_per_step, train_seconds))
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == stop:
            eval_loss = evaluate()
            history["eval_loss_after"] = eval_loss
            last_eval = done
            emit(Evaluated(done, eval_loss))
        if (cfg.save_every and done % cfg.save_every == 0) or done == stop:
            save(done)
    if last_eval != stop:  # nothing left to train (resumed at the end): still report a fresh evaluation
        eval_loss = evaluate()
        history["eval_loss_after"] = eval_loss
    trained = (stop - start) * tokens_per_step
    return TrainResult(
        steps=stop, tokens=trained, total_tokens=stop * tokens_per_step, first_loss=history["first_loss"],
        final_loss=history.get("final_loss", math.nan), eval_loss_before=history["eval_loss_before"],
        eval_loss_after=eval_loss, seconds=time.perf_counter() - began, train_seconds=train_seconds,
        tokens_per_second=trained / train_seconds if train_seconds > 0 else 0.0,
        start_step=start, out=Path(cfg.out), losses=losses, is_main=env.is_main,
        skipped_steps=history.get("skipped_steps", 0))


@torch.no_grad()
def _evaluate(denoiser: BlockDenoiser, contexts: Callable[[Tensor], BlockContext], ids: Tensor, cfg: TrainConfig,
              mask_id: int, env: Dist) -> float:
    """Mean masked cross-entropy over the held-out sequences, with noise fixed by the seed (the same masks
    at every evaluation, however the sequences are batched or sharded). With FSDP every rank runs as many
    forwards as the busiest one (their gathers are collective); a rank out of sequences scores none."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _EVAL))
    noisy, mask, t = add_noise(ids, cfg.block, mask_id, gen, cfg.noise_per)
    total, count = 0.0, 0.0
    starts = range(env.rank * cfg.batch, len(ids), env.world * cfg.batch)
    rounds = math.ceil(len(ids) / (env.world * cfg.batch)) if cfg.fsdp else len(starts)
    for k in range(rounds):
        if k >= len(starts):  # FSDP: this rank is out of sequences; its forward keeps the gathers in step
            x = ids[:1].to(env.device)
            denoiser(noisy[:1].to(env.device), t[:1].to(env.device), contexts(x), x, mask[:1].to(env.device))
            continue
        sl = slice(starts[k], starts[k] + cfg.batch)
        x = ids[sl].to(env.device)
        m = mask[sl].to(env.device)
        total += denoiser(noisy[sl].to(env.device), t[sl].to(env.device), contexts(x), x, m, reduction="sum").item()
        count += m.sum().item()
    if cfg.fsdp:  # FSDP leaves a root's parameters gathered after a forward that no backward follows
        denoiser.reshard()
    total, count = env.all_sum(total, count)
    return total / max(count, 1.0)
