"""tokenize: command-line paths and what it fetches (the stream itself is tested against `train`'s in test_train.py)."""

from __future__ import annotations

import shutil

import numpy as np
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
