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
