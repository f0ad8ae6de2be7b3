"""`--compile` (issue 8): generate and bench pass it down to `TowerBackend.compile`; off by default.

The CLI tests record `compile` instead of running it. `test_compiled_regions_*` runs the real
`TowerBackend.compile` with dynamo's "eager" backend (tracing, guards and graph breaks exactly as with
inductor, without inductor's code generation, which takes minutes on 2 CPU cores): every step the sampler
takes must trace without a graph break and give the eager numbers.
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
    kernels._reset_probe()
    kernels.prepare_compile()
    assert kernels._probe_result, "the kernels must be probed before tracing, not inside a graph"
    kernels.prepare_compile()  # idempotent: wraps once
    for name in kernels._EAGER:
        fn = getattr(kernels, name)
        assert getattr(fn, "_torchdynamo_disable", False), name
        assert not getattr(fn._torchdynamo_orig_callable, "_torchdynamo_disable", False), name


@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit", "sdpa"])
def test_compiled_regions_trace_without_graph_breaks_and_match_eager(folder, sdpa):
    """Prompt (eager: longer than COMPILE_MAX_TOKENS), short left-padded prompt, one-token decodes, a block
    extension and denoiser blocks with and without time conditioning, before and after compile, on one
    model; with the explicit attention (CPU) and with SDPA forced (CUDA's path: grouped keys/values, the
    packed and expanded routes for masks)."""
    import torch
    from torch._dynamo.utils import counters

    from twotower_cli import towers
    from twotower_cli.ops import kernels

    loaded = towers.load_model(folder, need_denoiser=True)
    backend = TowerBackend(loaded.twotower, loaded.ar)
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(4, 40, (2, towers.COMPILE_MAX_TOKENS + 6), generator=g)
    short_prompt = torch.randint(4, 40, (2, 9), generator=g)
    steps = [torch.randint(4, 40, (2, 1), generator=g) for _ in range(3)]
    block = torch.randint(4, 40, (2, 4), generator=g)
    masks = torch.full((2, 4), 3)

    pads = torch.ones(2, 9, dtype=torch.bool)
    pads[1, :3] = False

    def run():
        outs = []
        for prompt, mask in ((long_prompt, None), (short_prompt, pads)):
            backend.reset(2)
            outs.append(backend.extend(prompt, attention_mask=mask))
            for s in steps:
                outs.append(backend.extend(s))
            outs.append(backend.denoise(masks, torch.tensor([0.3, 0.9])))
            outs.append(backend.denoise(masks, None))
            outs.append(backend.extend(block))
            outs.append(backend.denoise(masks, torch.tensor([0.5, 0.5])))
        return outs

    with torch.no_grad(), kernels.force(sdpa=sdpa):
        ref = run()
        torch._dynamo.reset()
        counters.clear()
        backend.compile(backend="eager")
        got = run()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
