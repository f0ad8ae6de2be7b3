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


def test_loading_a_model_does_not_import_dynamo():
    """torch._dynamo costs ~1 s of start-up: nothing on the way to a first generated token may import it
    unless --compile asks for it (it came in once through `torch.compiler.disable` decorators at import,
    once through nn.Embedding's init on the meta device)."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from twotower_cli.runtime import open_runtime\n"
            "rt = open_runtime('tiny', True)\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prepare_compile_keeps_every_kernel_wrapper_out_of_graphs(monkeypatch):
    from twotower_cli.ops import kernels

    for name in kernels._EAGER:  # restored after the test: other tests call the plain wrappers
        monkeypatch.setattr(kernels, name, getattr(kernels, name))
    assert set(kernels._EAGER) >= {"call", "ssd_chunked", "ssd_step", "causal_conv", "gated_rmsnorm"}
    kernels.prepare_compile()
    kernels.prepare_compile()  # idempotent: wraps once
    for name in kernels._EAGER:
        fn = getattr(kernels, name)
        assert getattr(fn, "_torchdynamo_disable", False), name
        assert not getattr(fn._torchdynamo_orig_callable, "_torchdynamo_disable", False), name
