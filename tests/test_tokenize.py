"""tokenize: command-line paths (the stream itself is tested against `train`'s in test_train.py)."""

from __future__ import annotations

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
