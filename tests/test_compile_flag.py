"""`--compile` (issue 8): generate and bench pass it down to `TowerBackend.compile`; off by default.

The compiled steps themselves give the same tokens (checked by hand on CPU: identical tokens for
mask_diffusion and ar on the tiny model), but inductor takes minutes on 2 CPU cores, so the suite checks
the plumbing with `compile` recorded instead of run.
"""

from __future__ import annotations

import json

import pytest
from tests.twotower_helpers import random_base, tiny_cfg, write_twotower
from typer.testing import CliRunner

from twotower_cli.cli import get_app
from twotower_cli.towers import TowerBackend


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_twotower(tmp_path_factory.mktemp("compile") / "tt", random_base(tiny_cfg(), seed=2))


@pytest.mark.parametrize("flag", [False, True])
def test_generate_compile_flag(folder, monkeypatch, flag):
    calls = []
    monkeypatch.setattr(TowerBackend, "compile", lambda self: calls.append(self) or self)
    args = ["generate", "hello", "--model", str(folder), "--block", "4", "-n", "8", "--json"]
    r = CliRunner().invoke(get_app(), args + (["--compile"] if flag else []))
    assert r.exit_code == 0, r.output
    assert len(calls) == int(flag)
    assert json.loads(r.stdout.splitlines()[0])["token_ids"]


def test_bench_compile_flag(folder, monkeypatch):
    calls = []
    monkeypatch.setattr(TowerBackend, "compile", lambda self: calls.append(self) or self)
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "-n", "4", "--block", "4",
                                       "--thresholds", "0.8", "--repeat", "1", "--json", "--compile"])
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
