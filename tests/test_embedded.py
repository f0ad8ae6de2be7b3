"""The embedded tiny models shipped in the package (issue 7): sound checkpoints, the `tiny` alias in every
command, and each sampling mode working on them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from twotower_cli.cli import get_app
from twotower_cli.hub import ASSETS, resolve

runner = CliRunner()


def run(*args):
    return runner.invoke(get_app(), list(args))


@pytest.mark.parametrize("name", ["tiny-base", "tiny-twotower"])
def test_shipped_checkpoints_pass_inspect(name):
    r = run("inspect", str(ASSETS / name), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["problems"] == []
    assert report["layout"] == ("twotower" if name == "tiny-twotower" else "nemotron_h")
    assert set(report["pattern"]) == set("M*E-")  # all four layer kinds


def test_shipped_size_within_budget():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 25_000_000, f"{total / 1e6:.1f} MB"


def test_tiny_alias_resolves_for_each_command(tmp_path):
    assert resolve("tiny") == ASSETS / "tiny-twotower"
    assert resolve("tiny", base=True) == ASSETS / "tiny-base"
    r = run("inspect", "tiny", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["layout"] == "twotower"
    r = run("split", "tiny", "-o", str(tmp_path / "tt"), "--dry-run")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "tt").exists()


@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar", "ar"])
def test_generate_each_mode_on_the_embedded_model(mode):
    r = run("generate", "ROMEO.", "--mode", mode, "-n", "12", "--json")  # no --model: the embedded default
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["mode"] == mode and 1 <= len(out["token_ids"]) <= 12
    assert out["model"].endswith("tiny-twotower")
    assert out["text"].strip()


def test_embedded_split_reproduces_the_context_tower(tmp_path):
    """Splitting the shipped base gives a TwoTower whose context tower equals the shipped TwoTower's."""
    from twotower_cli.checkpoint import open_checkpoint

    r = run("split", "tiny-base", "-o", str(tmp_path / "fresh"))
    assert r.exit_code == 0, r.output
    fresh, shipped = open_checkpoint(tmp_path / "fresh"), open_checkpoint(ASSETS / "tiny-twotower")
    names = [n for n in shipped.tensors if n.startswith("context_")]
    a = dict(fresh.iter_tensors(names))
    b = dict(shipped.iter_tensors(names))
    assert all(a[n].equal(b[n]) for n in names)
