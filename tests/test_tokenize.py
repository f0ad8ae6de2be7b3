"""tokenize: command-line paths, what it fetches, plain text read in pieces of bounded size (the stream itself is
tested against `train`'s in test_train.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.twotower_helpers import fed_through_a_pipe
from typer.testing import CliRunner

from twotower_cli.cli import get_app
from twotower_cli.hub import resolve
from twotower_cli.text import Tokenizer


def test_tokenize_expands_tilde_in_paths(tmp_path, monkeypatch):
    """`--data=~/x` and `--out=~/y` reach us unexpanded (shells expand ~ only at the start of a word)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "d.txt").write_text("ROMEO. Hello.")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data=~/d.txt", "--out=~/c.npy"])
    assert r.exit_code == 0, r.output
    assert np.load(home / "c.npy").tolist() == Tokenizer(resolve("tiny")).encode("ROMEO. Hello.")
    assert not (tmp_path / "~").exists()


def test_tokenize_fetches_no_weights(tmp_path, monkeypatch):
    """Tokenizing needs config.json and the tokenizer, not the checkpoint's weights (63 GB for Nano)."""
    snap = tmp_path / "snap"
    snap.mkdir()
    for f in resolve("tiny").iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, snap / f.name)
    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw)
        return str(snap)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "d.txt").write_text("ROMEO. Hello.")
    r = CliRunner().invoke(get_app(), ["tokenize", "org/model", "--data", str(tmp_path / "d.txt"),
                                       "-o", str(tmp_path / "c.npy")])
    assert r.exit_code == 0, r.output
    assert "config.json" in seen["allow_patterns"] and "tokenizer.json" in seen["allow_patterns"]
    assert not any(p.endswith((".safetensors", ".index.json")) for p in seen["allow_patterns"])
    assert np.load(tmp_path / "c.npy").tolist() == Tokenizer(resolve("tiny")).encode("ROMEO. Hello.")


def test_sigterm_mid_tokenize_leaves_nothing(tmp_path):
    """SIGTERM (`kill`, `timeout`, a scheduler) ends tokenize as Ctrl-C does (`cli.guarded`): one Error line,
    exit 1, and neither OUT nor its raw / partial files beside it (by default the process would die at once
    and leave `.OUT.raw-PID` behind, as large as the token stream)."""
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "ROMEO. Hello number {i}."}}\n' for i in range(50)))
    out = tmp_path / "out" / "tokens.npy"
    code = f"""
import os, signal, time
from twotower_cli import train
from twotower_cli.cli import get_app
real = train.iter_token_chunks
def chunks(*args, **kwargs):
    for i, chunk in enumerate(real(*args, **kwargs)):
        yield chunk
        os.kill(os.getpid(), signal.SIGTERM)  # after the first chunk is written to the raw file
        time.sleep(1)
train.iter_token_chunks = chunks
get_app()(["tokenize", "tiny", "--data", {str(data)!r}, "-o", {str(out)!r}], prog_name="twotower")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "Error: interrupted", (r.returncode, r.stderr)
    assert sorted(p.name for p in out.parent.iterdir()) == []


def _tokenize(data, out):
    return CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(data), "-o", str(out), "--force"])


def test_an_interrupt_between_the_stream_and_its_meta_never_pairs_them_wrongly(tmp_path, monkeypatch):
    """OUT and OUT's meta file (which names the vocabulary) cannot change in one step. Interrupted between
    the two, a re-tokenize must not leave the new meta file beside the old stream (it was: the meta file was
    put in place first), which `train` would take for the new vocabulary's ids: the old meta goes first,
    and what is left is a stream without a meta file, or the old pair."""
    from twotower_cli import train as T

    (tmp_path / "a.txt").write_text("ROMEO. Hello.")
    (tmp_path / "b.txt").write_text("JULIET. Good night, good night!")
    out = tmp_path / "c.npy"
    assert _tokenize(tmp_path / "a.txt", out).exit_code == 0
    old_ids, old_meta = np.load(out).tolist(), T.token_file_meta(out).read_text()
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out:  # the new stream taking OUT's name
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(T.os, "replace", replace)
    r = _tokenize(tmp_path / "b.txt", out)
    assert r.exit_code == 1 and "interrupted" in r.output
    meta = T.token_file_meta(out)
    assert np.load(out).tolist() == old_ids
    assert not meta.exists() or meta.read_text() == old_meta  # never the new meta beside the old ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.npy"]


def test_tokenize_removes_what_a_killed_run_left(tmp_path):
    """A run killed at once (kill -9) leaves its raw file, as large as the token stream, and its partial
    .npy beside OUT; the next tokenize to OUT removes this machine's dead runs' (not another machine's)."""
    import subprocess
    import sys

    from twotower_cli.checkpoint import _machine

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    out = tmp_path / "c.npy"
    left = [f".c.npy.raw-{_machine()}-{dead.pid}", f".c.npy.part-{_machine()}-{dead.pid}.npy",
            f".c.meta.json.part-{_machine()}-{dead.pid}"]
    foreign = f".c.npy.raw-{'0' * 12}-{dead.pid}"
    for name in [*left, foreign]:
        (tmp_path / name).write_bytes(b"x" * 100)
    (tmp_path / "a.txt").write_text("ROMEO. Hello.")
    assert _tokenize(tmp_path / "a.txt", out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([foreign, "a.txt", "c.meta.json", "c.npy"])


# ------------------------------------------------------------------------------ plain text, read in pieces

WORDS = ("the king and queen of France, my lord; Hélène’s letter — 日本 said: “Go!” ROMEO. well, 42 times? "
         "ay... (aside) [Exit] naïve").split()


def ordinary_text(n_lines: int, seed: int = 0) -> str:
    """Prose and verse lines as corpora have them: blank lines (runs of 1-3), indented and very long lines
    (longer than the test's pieces), lines ending in punctuation, Windows and old-Mac line ends, a wide run
    of spaces, non-ASCII text."""
    import random

    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.choice((1, 3, 8, 14, 90))))
        lead = rng.choice(("", "", "", "  ", "\t", "    "))
        end = rng.choice(("\n", "\n", "\n", "\n\n", "\n\n\n", ".\n\n", "\r\n", "\r\n\r\n", " \n", "\r"))
        lines.append(lead + words + (" " * 300 if i % 97 == 50 else "") + end)
    return "".join(lines)


def variant_tokenizer(tmp_path, kind: str) -> Tokenizer:
    """The tiny tokenizer, with merges across line breaks ("ĊĊ", "ĠĊ", ".Ċ" as new entries) and a pre-tokenizer
    of the Llama-3 / GPT-4 kind (runs of newlines, and punctuation with the newlines after it, are one piece),
    or that prefixes a space to a text (`add_prefix_space`), or with a BOS and an EOS around each text, or whose
    normalizer puts a space before every text (`Prepend`, as "▁" in Llama-2-era tokenizers): no cut at a line end
    nor before a space ever passes for that one (checked where it is used)."""
    import json

    spec = json.loads((resolve("tiny") / "tokenizer.json").read_text())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    if kind == "newlines":
        for pair in (("Ċ", "Ċ"), ("ĊĊ", "Ċ"), ("Ġ", "Ċ"), (".", "Ċ"), (".Ċ", "Ċ"), ("č", "Ċ"), ("Ġ", "Ġ")):
            vocab.setdefault("".join(pair), len(vocab))
            merges.insert(0, list(pair) if isinstance(merges[0], list) else " ".join(pair))
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    elif kind == "prefix-space":
        spec["pre_tokenizer"]["add_prefix_space"] = True
    elif kind == "prepend":
        spec["normalizer"] = {"type": "Prepend", "prepend": " "}
    elif kind == "bos-eos":
        spec["post_processor"] = {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "</s>", "type_id": 0}}], "pair": [], "special_tokens": {
            "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}, "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    folder = tmp_path / f"tok-{kind}"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return Tokenizer(folder)


@pytest.mark.parametrize("kind", ["tiny", "newlines", "prefix-space", "bos-eos"])
def test_text_read_in_pieces_gives_the_ids_of_the_whole(tmp_path, monkeypatch, kind):
    """A text file is read in pieces of TEXT_PIECE_CHARS characters and still gives exactly `encode` of its
    whole text (newlines as `read_text` reads them: '\\r\\n' and '\\r' as '\\n'), including for tokenizers that
    merge across line breaks, prefix a space to a text or wrap it in BOS/EOS, where cutting at any line
    end would change tokens (checked here, so the text does exercise the cuts)."""
    from twotower_cli import train

    tok = Tokenizer(resolve("tiny")) if kind == "tiny" else variant_tokenizer(tmp_path, kind)
    path = tmp_path / "corpus.txt"
    path.write_bytes(ordinary_text(400).encode())
    text = path.read_text(encoding="utf-8")
    whole = tok.encode(text)
    lines = text.splitlines(keepends=True)
    if kind in ("newlines", "prefix-space", "bos-eos"):  # cutting after every newline would be wrong
        assert sum((tok.encode(line) for line in lines), []) != whole
    monkeypatch.setattr(train, "TEXT_PIECE_CHARS", 256)
    monkeypatch.setattr(train, "TEXT_PIECE_BATCH", 3)
    parts = list(train.iter_text_ids(path, tok))
    assert len(parts) > len(text) // 1024  # it was read in pieces (plus the affixes)
    streamed = sum(parts, [])
    first = next((i for i, (a, b) in enumerate(zip(streamed, whole, strict=False)) if a != b), None)
    assert streamed == whole, (len(streamed), len(whole), first)


def streamed_with_work(tok: Tokenizer, text: str, piece: int) -> tuple[list[int], int, int]:
    """`tok.encode_stream` of `text` read `piece` characters at a time: the ids, the pieces encoded (one list of
    ids each, beside the empty affixes), and the work its search for cuts did, in characters: those of the texts
    handed to `Tokenizer._cut` (searched) and to the tokenizer (encoded), the pieces themselves included."""
    import io

    work = [0]
    real_cut, real_encode, real_batch = Tokenizer._cut, Tokenizer.encode, Tokenizer.encode_batch

    def cut(self, text, *args, **kwargs):
        work[0] += len(text)
        return real_cut(self, text, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        work[0] += len(text)
        return real_encode(self, text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        work[0] += sum(map(len, texts))
        return real_batch(self, texts, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Tokenizer, "_cut", cut)
        m.setattr(Tokenizer, "encode", encode)
        m.setattr(Tokenizer, "encode_batch", encode_batch)
        parts = list(tok.encode_stream(io.StringIO(text, newline=""), piece_chars=piece, batch=1))
    return sum(parts, []), sum(1 for p in parts if p), work[0]


@pytest.mark.parametrize("kind", ["prepend", "no-cut-stretch"])
def test_text_that_cannot_be_cut_is_searched_in_linear_work(tmp_path, kind):
    """A text that no cut can be found in for many pieces — every text, for a tokenizer whose normalizer puts a
    space before each text (each piece would start with one the whole has once), or, with the tiny tokenizer, a
    stretch without a line end or a space amid ordinary lines — still gives `encode` of the whole text, and the
    search does work in proportion to the text: 4 times the text, about 4 times the characters searched and
    encoded (it was ~16 times: each read was appended to the text held and the whole held text searched again)."""
    tok = variant_tokenizer(tmp_path, "prepend") if kind == "prepend" else Tokenizer(resolve("tiny"))

    def text(n):
        if kind == "prepend":
            return ordinary_text(n, seed=n)
        return ordinary_text(n // 2, seed=n) + "日本語の文章。" * (12 * n) + ordinary_text(n // 2, seed=n + 1)

    piece, runs = 64, {}
    for n in (100, 400):
        t = text(n)
        whole = tok.encode(t)
        ids, pieces, work = streamed_with_work(tok, t, piece)
        assert ids == whole, (n, len(ids), len(whole))
        runs[n] = len(t), pieces, work
    (small, pieces_small, work_small), (large, pieces_large, work_large) = runs[100], runs[400]
    assert large > 3.5 * small > 100 * piece  # many pieces long
    if kind == "prepend":  # no cut passes anywhere: one piece, the whole text (checked on a line end and a space)
        t = "The king said hello.\nThe queen said nothing."
        for cut in (t.index("\n") + 1, t.index(" said")):
            assert tok.encode(t, False) != tok.encode(t[:cut], False) + tok.encode(t[cut:], False)
        assert pieces_small == pieces_large == 1
    else:  # cut before the stretch and after it
        assert pieces_small > 10 and pieces_large > 40
    ratio = (work_large / large) / (work_small / small)
    assert ratio < 1.3, (work_small, small, work_large, large, ratio)


def test_tokenize_reads_text_in_bounded_pieces(tmp_path, monkeypatch):
    """`tokenize --data X.txt` never reads, nor hands the tokenizer, more than about one piece of the text at a
    time (the reads and the encoded texts are recorded), and writes the stream of the text encoded whole."""
    from twotower_cli import train

    piece, reads, encoded = 512, [], []

    class Recorded:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append((n, len(data)))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def recorded_open(*args, **kwargs):
        return Recorded(open(*args, **kwargs))

    real_encode, real_batch = Tokenizer.encode, Tokenizer.encode_batch

    def encode(self, text, *args, **kwargs):
        encoded.append(len(text))
        return real_encode(self, text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        encoded.extend(len(t) for t in texts)
        return real_batch(self, texts, *args, **kwargs)

    path = tmp_path / "corpus.txt"
    path.write_text(ordinary_text(300, seed=1), encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    expected = Tokenizer(resolve("tiny")).encode(text)
    monkeypatch.setattr(train, "open", recorded_open, raising=False)
    monkeypatch.setattr(train, "TEXT_PIECE_CHARS", piece, raising=False)
    monkeypatch.setattr(Tokenizer, "encode", encode)
    monkeypatch.setattr(Tokenizer, "encode_batch", encode_batch)
    r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(path), "-o", str(tmp_path / "c.npy")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "c.npy").tolist() == expected
    assert sum(got for _, got in reads) == len(text) > 20 * piece
    assert reads and all(0 < n <= piece for n, _ in reads), sorted(reads)[-3:]
    assert max(encoded) <= 2 * piece, max(encoded)


def test_text_not_utf8_past_the_first_pieces_leaves_nothing(tmp_path, monkeypatch):
    """A byte that is not UTF-8 deep in a text file is found after pieces before it were encoded and written:
    still one Error line, exit 1, and no OUT nor partial files beside it."""
    from twotower_cli import train

    monkeypatch.setattr(train, "TEXT_PIECE_CHARS", 256)
    (tmp_path / "d.txt").write_bytes(ordinary_text(200).encode() + b"\xff\xfe" + ordinary_text(10).encode())
    out = tmp_path / "out" / "c.npy"
    r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(tmp_path / "d.txt"), "-o", str(out)])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "is not UTF-8 text" in lines[0], r.output
    assert sorted(p.name for p in out.parent.iterdir()) == []


@pytest.mark.parametrize("command", ["tokenize", "train", "eval"])
def test_a_jsonl_record_holding_half_a_surrogate_pair_names_its_line(tmp_path, command):
    """{"text": "\\ud800"} (JSON's escape of half a surrogate pair, as scraped corpora hold) was the tokenizer's
    "TypeError: TextEncodeInput must be …", "this looks like a bug", from tokenize, train and eval alike."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the quick brown fox"}\n' * 40 + '{"text": "ok \\udc00 no"}\n')
    out = tmp_path / "out"
    args = {"tokenize": ["tokenize", "tiny", "--data", str(data), "-o", str(out / "c.npy")],
            "train": ["train", "tiny", "--data", str(data), "-o", str(out), "--steps", "1"],
            "eval": ["eval", "--data", str(data)]}[command]
    r = CliRunner().invoke(get_app(), args)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: {data}:41 holds a lone UTF-16 surrogate escape (\\udc00, at character 3)"), lines
    assert not out.exists() or list(out.iterdir()) == []  # (tokenize makes -o's folder first, as it always has)


def test_a_tokenizer_saved_with_truncation_and_padding_gives_the_whole_text(tmp_path):
    """A tokenizer.json saved with truncation (max_length 4) and padding on: prompts and corpus documents keep
    every id, none added (the tokenizer as saved cuts and pads, which the assertion first shows)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    src = resolve("tiny")
    text = "ROMEO. What light through yonder window breaks?"
    plain = HFTokenizer.from_file(str(src / "tokenizer.json"))
    whole = plain.encode(text, add_special_tokens=False).ids
    plain.enable_truncation(max_length=4)
    plain.enable_padding(length=64, pad_id=0)
    folder = tmp_path / "tok"
    folder.mkdir()
    plain.save(str(folder / "tokenizer.json"))
    saved = json.loads((folder / "tokenizer.json").read_text())
    assert saved["truncation"] and saved["padding"]
    assert HFTokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids != whole
    tok = Tokenizer(folder)
    assert len(whole) > 4
    assert tok.encode(text, add_special_tokens=False) == whole
    short = HFTokenizer.from_file(str(src / "tokenizer.json")).encode("ROMEO.", add_special_tokens=False).ids
    assert tok.encode_batch([text, "ROMEO."], add_special_tokens=False) == [whole, short]


@pytest.mark.parametrize("suffix, text", [
    (".txt", "ROMEO.\nBut soft, what light through yonder window breaks?\n"),
    (".jsonl", '{"text": "ROMEO. But soft!"}\n{"text": "JULIET. Ay me."}\n'),
])
def test_a_byte_order_mark_is_not_data(tmp_path, suffix, text):
    """A file saved with a UTF-8 byte-order mark (Windows editors, PowerShell) gives the stream of the same
    file without it: the mark was tokenized into the text, and a JSONL file's line 1 was "not valid JSON"."""
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    for f in (plain, marked):
        r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(f), "-o", str(f.with_suffix(".npy"))])
        assert r.exit_code == 0, r.output
    assert np.load(marked.with_suffix(".npy")).tolist() == np.load(plain.with_suffix(".npy")).tolist()


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_compressed_data_is_read_as_it_is(tmp_path, compression, suffix):
    """corpus.jsonl.gz (as datasets ship): the stream of the file decompressed (it was "not UTF-8 text"); a
    damaged one is one error line and writes nothing."""
    import bz2
    import gzip
    import lzma

    text = ('{"text": "ROMEO. But soft!"}\n{"text": "JULIET. Ay me."}\n' if suffix == ".jsonl"
            else "ROMEO.\nBut soft, what light through yonder window breaks?\n" * 50)
    plain, packed = tmp_path / f"d{suffix}", tmp_path / f"d{suffix}.{compression}"
    plain.write_text(text)
    packed.write_bytes({"gz": gzip, "bz2": bz2, "xz": lzma}[compression].compress(text.encode()))
    for f, out in ((plain, "plain.npy"), (packed, "packed.npy")):
        r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(f), "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "packed.npy").tolist() == np.load(tmp_path / "plain.npy").tolist()
    cut = tmp_path / f"cut{suffix}.{compression}"
    cut.write_bytes(packed.read_bytes()[:len(packed.read_bytes()) // 2])
    r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(cut), "-o", str(tmp_path / "cut.npy")])
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: data file {cut} cannot be decompressed as {compression}")
    assert r.stderr.count("\n") == 1 and not (tmp_path / "cut.npy").exists()


def test_a_json_file_is_read_as_json_lines_and_an_array_is_refused(tmp_path):
    """data.json holding JSON lines (as datasets often name them) is read as .jsonl is: it was tokenized as text,
    braces, keys and all. A JSON array, on one line or pretty-printed, is one error line pointing at jq."""
    lines = '{"text": "ROMEO. But soft!"}\n{"text": "JULIET. Ay me."}\n'
    (tmp_path / "d.jsonl").write_text(lines)
    (tmp_path / "d.json").write_text(lines)
    for name in ("d.jsonl", "d.json"):
        r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(tmp_path / name), "-o",
                                           str(tmp_path / f"{name}.npy")])
        assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "d.json.npy").tolist() == np.load(tmp_path / "d.jsonl.npy").tolist()
    for body, said in (('[{"text": "a"}, {"text": "b"}]\n', "is a JSON array, not one object"),
                       ('[\n  {"text": "a"}\n]\n', "is not valid JSON")):
        (tmp_path / "a.json").write_text(body)
        r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(tmp_path / "a.json"), "-o",
                                           str(tmp_path / "a.npy")])
        assert r.exit_code == 1 and r.stderr.startswith(f"Error: {tmp_path / 'a.json'}:1 {said}"), r.output
        assert f"jq -c '.[]' {tmp_path / 'a.json'}" in r.stderr and not (tmp_path / "a.npy").exists()


def test_zstd_data_points_at_a_pipe(tmp_path):
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(tmp_path / "c.jsonl.zst"), "-o",
                                       str(tmp_path / "c.npy")])
    assert r.exit_code == 1 and r.stderr.strip().endswith(f"(hint: decompress it on the fly: --data <(zstd -dc "
                                                          f"{tmp_path / 'c.jsonl.zst'}))"), r.output


def test_tokenize_reads_a_pipe_as_it_reads_the_file(tmp_path):
    """`--data <(zcat corpus.txt.gz)`: a pipe (here a named one, written by a thread) gives the stream the
    same text as a file gives; a folder is refused by name, as data and as -o (which said "does not end in
    .npy", with the hint of a sibling file)."""
    text = "ROMEO.\nBut soft, what light through yonder window breaks?\n\n" * 200
    (tmp_path / "d.txt").write_text(text)
    fifo = fed_through_a_pipe(tmp_path / "pipe", text)
    r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(fifo), "-o", str(tmp_path / "p.npy")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(tmp_path / "d.txt"), "-o", str(tmp_path / "f.npy")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "p.npy"), np.load(tmp_path / "f.npy"))
    r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(tmp_path), "-o", str(tmp_path / "x.npy")])
    assert r.exit_code == 1 and f"data file {tmp_path} is a folder, not a file" in r.stderr, r.output
    r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(tmp_path / "d.txt"), "-o", str(tmp_path)])
    assert r.exit_code == 1 and r.stderr == (f"Error: {tmp_path} is a folder (hint: name the file to write, e.g. "
                                             f"-o {tmp_path / 'tokens.npy'})\n"), r.output


@pytest.mark.parametrize("lead", ["", "\n\n"])
def test_a_pipe_of_json_lines_is_read_as_json_lines(tmp_path, lead):
    """`--data <(zstd -dc corpus.jsonl.zst)`, as the README and the zstd error's hint say: a pipe has no name
    to tell JSON lines by, and was read as one plain-text document, braces and "text" keys included (1
    document where the file gives 3). Its first non-empty line now tells: the stream and the document count
    equal the .jsonl file's, blank lines before it or not. A pipe of plain text whose first line is JSON of
    another shape stays text."""
    lines = [json.dumps({"text": t}) for t in ("ROMEO.\nBut soft!", "JULIET.\nAy me.", "{not json} at all")]
    text = lead + "\n".join(lines) + "\n"
    (tmp_path / "d.jsonl").write_text(text)
    out = {}
    for name, data in (("file", tmp_path / "d.jsonl"), ("pipe", fed_through_a_pipe(tmp_path / "pipe", text))):
        r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(data), "-o", str(tmp_path / f"{name}.npy"),
                                           "--json"])
        assert r.exit_code == 0, r.output
        out[name] = (json.loads(r.stdout)["documents"], np.load(tmp_path / f"{name}.npy"))
    assert out["file"][0] == out["pipe"][0] == 3
    assert np.array_equal(out["file"][1], out["pipe"][1])
    plain = '{"title": "not a record"}\nROMEO.\nBut soft!\n'
    (tmp_path / "plain.txt").write_text(plain)
    for name, data in (("plain-file", tmp_path / "plain.txt"), ("plain-pipe", fed_through_a_pipe(tmp_path / "p2", plain))):
        r = CliRunner().invoke(get_app(), ["tokenize", "tiny", "--data", str(data), "-o", str(tmp_path / f"{name}.npy")])
        assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "plain-file.npy"), np.load(tmp_path / "plain-pipe.npy"))


def test_the_checkpoint_may_be_named_with_m_as_elsewhere(tmp_path):
    """`tokenize -m tiny a.txt b.txt -o x.npy` (as generate, bench, eval name a model): the positional files are
    all data then; the stream equals `tokenize tiny a.txt b.txt`'s. Neither given: one error line."""
    (tmp_path / "a.txt").write_text("ROMEO. Hello.")
    (tmp_path / "b.txt").write_text("JULIET. Good night.")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    first = CliRunner().invoke(get_app(), ["tokenize", "tiny", *files, "-o", str(tmp_path / "first.npy")])
    named = CliRunner().invoke(get_app(), ["tokenize", "-m", "tiny", *files, "-o", str(tmp_path / "named.npy")])
    assert first.exit_code == 0 and named.exit_code == 0, named.output
    assert np.load(tmp_path / "named.npy").tolist() == np.load(tmp_path / "first.npy").tolist()
    assert "2 documents" in " ".join(named.stderr.split())
    neither = CliRunner().invoke(get_app(), ["tokenize", "--data", files[0], "-o", str(tmp_path / "x.npy")])
    assert neither.exit_code == 1 and neither.stderr.startswith("Error: no checkpoint given")
    assert "-m CKPT" in neither.stderr and neither.stderr.count("\n") == 1
    # A data file where the checkpoint goes (the natural first guess): named as such, before any other check.
    for cmd in ("tokenize", "train"):
        data_first = CliRunner().invoke(get_app(), [cmd, files[0], "-o", str(tmp_path / "y.npy")])
        assert data_first.exit_code == 1, data_first.output
        assert data_first.stderr.startswith(f"Error: {files[0]} is a data file, not a checkpoint"), data_first.stderr
        assert f"--data {files[0]}" in data_first.stderr and data_first.stderr.count("\n") == 1
        os.mkfifo(tmp_path / f"{cmd}.pipe")  # never opened: named for what it is
        pipe_first = CliRunner().invoke(get_app(), [cmd, str(tmp_path / f"{cmd}.pipe"), "-o", str(tmp_path / "y.npy")])
        assert pipe_first.stderr.startswith(f"Error: {tmp_path / cmd}.pipe is a pipe, not a checkpoint (hint: name "
                                            f"the checkpoint first, as in `twotower {cmd} CKPT --data <(…) -o OUT`")
        # (it said "no data files given": the pipe was taken for the checkpoint)
    assert not (tmp_path / "y.npy").exists()
