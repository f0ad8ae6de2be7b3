"""`--compile` (issue 8): generate and bench pass it down to `TowerBackend.compile`; off by default.

The CLI tests record `compile` instead of running it. `test_compiled_regions_*` runs the real
`TowerBackend.compile` with dynamo's "eager" backend (tracing, guards and graph breaks exactly as with
inductor, without inductor's code generation, which takes minutes on 2 CPU cores): every step the sampler
takes must trace without a graph break and give the eager numbers.
"""

from __future__ import annotations

import json
import re

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
    """Prompt, short left-padded prompt (both eager: neither one token nor a block), one-token decodes, a block
    extension and denoiser blocks with and without time conditioning, before and after compile, on one
    model; with the explicit attention (CPU) and with SDPA forced (CUDA's path: grouped keys/values, the
    packed and expanded routes for masks). Traced at a batch of 4, the conv kernel's width: under dynamo's
    duck sizing the batch was one symbol with the conv state's width and pinned to 4 with it, and every Mamba
    and attention layer recompiled at the next batch size (continuous batching changes it as rows end). The
    same steps at a batch of 2 now run on the graphs already there. A one-token prompt that joins the batch
    is a first step (an empty past): eager like any prompt, where it compiled a graph of its own."""
    import torch
    from torch._dynamo.utils import counters

    from twotower_cli import towers
    from twotower_cli.ops import kernels

    loaded = towers.load_model(folder, need_denoiser=True)
    assert loaded.cfg.conv_kernel == 4
    backend = TowerBackend(loaded.twotower, loaded.ar)
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(4, 40, (4, 70), generator=g)
    short_prompt = torch.randint(4, 40, (4, 9), generator=g)
    steps = [torch.randint(4, 40, (4, 1), generator=g) for _ in range(3)]
    block = torch.randint(4, 40, (4, 4), generator=g)
    masks = torch.full((4, 4), 3)
    times = [torch.tensor([0.3, 0.9, 0.5, 0.1]), torch.tensor([0.5, 0.5, 0.2, 0.7])]

    pads = torch.ones(4, 9, dtype=torch.bool)
    pads[1, :3] = False
    pads[3, :5] = False

    def run(b):
        outs = []
        for prompt, mask in ((long_prompt, None), (short_prompt, pads)):
            backend.reset(b)
            outs.append(backend.extend(prompt[:b], attention_mask=None if mask is None else mask[:b]))
            for s in steps:
                outs.append(backend.extend(s[:b]))
            outs.append(backend.denoise(masks[:b], times[0][:b]))
            outs.append(backend.denoise(masks[:b], None))
            outs.append(backend.extend(block[:b]))
            outs.append(backend.denoise(masks[:b], times[1][:b]))
        return outs

    with torch.no_grad(), kernels.force(sdpa=sdpa):
        ref = run(4)
        torch._dynamo.reset()
        counters.clear()
        backend.compile(backend="eager")
        got = run(4)
        graphs = counters["stats"]["unique_graphs"]
        two = run(2)
        backend.join(torch.tensor([[7]]))  # a one-token prompt joining the batch: a first step, so eager
    new_graphs = counters["stats"]["unique_graphs"] - graphs
    torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs > 0, "nothing was compiled"
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(two, ref, strict=True):
        torch.testing.assert_close(a, b[:2], rtol=1e-5, atol=1e-5)
    assert new_graphs == 0, f"{new_graphs} graphs compiled for a batch of 2 or a joining prompt"


def test_the_cache_a_prompt_leaves_has_the_layout_of_every_later_one(folder):
    """A first step's keys and values went into the cache as they came out of the projection, a transposed
    view (time stride heads x head dim), where every later step leaves torch.cat's contiguous tensors: the
    one-token step after a prompt compiled every attention layer again at the second one, for the other
    stride (and a block commit after rows left a batch, inside a timed run). Now both are contiguous."""
    import torch
    from torch._dynamo.utils import counters

    from twotower_cli import towers
    from twotower_cli.model.cache import KVCache

    loaded = towers.load_model(folder, need_denoiser=False)
    backend = TowerBackend(None, loaded.ar)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        backend.reset(2)
        backend.extend(torch.randint(4, 40, (2, 9), generator=g))
        kv = [c for c in backend.cache.layers if isinstance(c, KVCache)]
        assert kv and all(c.k.is_contiguous() and c.v.is_contiguous() for c in kv)
        torch._dynamo.reset()
        counters.clear()
        backend.compile(backend="eager")
        backend.extend(torch.randint(4, 40, (2, 1), generator=g))
        first = counters["stats"]["unique_graphs"]
        backend.extend(torch.randint(4, 40, (2, 1), generator=g))
        second = counters["stats"]["unique_graphs"] - first
    torch._dynamo.reset()
    assert first > 0 and second == 0, (first, second)


# ------------------------------------------------------------------- the warm-up before timed or shown work

def _compile_eagerly(monkeypatch) -> list[int]:
    """`TowerBackend.compile` with dynamo's eager backend (see the module docstring), counters cleared;
    returns a list that gets dynamo's count of graphs compiled so far at the end of each warm-up."""
    import torch
    from torch._dynamo.utils import counters

    from twotower_cli import sampler

    compile_, warm_up = TowerBackend.compile, sampler.warm_up
    after: list[int] = []

    def warm(*args, **kw):
        seconds = warm_up(*args, **kw)
        after.append(counters["stats"]["unique_graphs"])
        return seconds

    monkeypatch.setattr(TowerBackend, "compile", lambda self: compile_(self, backend="eager"))
    monkeypatch.setattr(sampler, "warm_up", warm)
    torch._dynamo.reset()
    counters.clear()
    return after


def _graphs() -> int:
    """Graphs compiled since `_compile_eagerly`; dynamo's caches are dropped for the next test."""
    import torch
    from torch._dynamo.utils import counters

    n = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return n


def test_generate_compile_warms_up_so_the_timed_run_compiles_nothing(folder, monkeypatch):
    """`generate --compile` compiled inside the run it timed (the tiny model: 1.7 tok/s shown, ~100 after
    compiling). A warm-up of three blocks now compiles first, said on stderr with its seconds: the run that
    follows compiles no graph, and its tokens are those of a run without --compile, sampling included (the
    warm-up draws from a generator of its own)."""
    mode = "mask_diffusion"  # (ar: the serve test below)
    args = ["generate", "hello there", "--model", str(folder), "--block", "4", "-n", "20", "--mode", mode,
            "--temperature", "0.9", "--seed", "5", "--json"]
    plain = CliRunner().invoke(get_app(), args)
    assert plain.exit_code == 0, plain.output
    assert "warm-up" not in plain.stderr
    after = _compile_eagerly(monkeypatch)
    r = CliRunner().invoke(get_app(), args + ["--compile"])
    graphs = _graphs()
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert len(after) == 1 and 0 < after[0] == graphs, (after, graphs)
    assert re.search(rf"^warm-up \d+\.\d s: compiled the {mode} steps$", r.stderr, re.M), r.stderr


def test_generate_compile_warms_up_a_batch_of_one_too(folder, monkeypatch, tmp_path):
    """5 prompts, --batch-size 4: the 5th runs alone once the first four end (so does the last row of any
    batch whose rows end at different steps), and a batch of one is another size to dynamo, which specializes
    1: every layer compiled again inside the timed run (here: ar 7 graphs after a warm-up of 7; mask_diffusion
    10 after 10, which takes this test from 10 s to 30 s). The warm-up now runs its first prompt alone too."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\nthe cat\nA\nwhat light through yonder window\nto be\n")
    args = ["generate", "--prompt-file", str(prompts), "--batch-size", "4", "--model", str(folder), "--block", "4",
            "-n", "12", "--mode", "ar", "--json"]
    plain = CliRunner().invoke(get_app(), args)
    assert plain.exit_code == 0, plain.output
    after = _compile_eagerly(monkeypatch)
    r = CliRunner().invoke(get_app(), args + ["--compile"])
    graphs = _graphs()
    assert r.exit_code == 0, r.output
    ids = [[json.loads(line)["token_ids"] for line in out.stdout.splitlines()] for out in (r, plain)]
    assert ids[0] == ids[1] and len(ids[0]) == 5
    assert len(after) == 1 and 0 < after[0] == graphs, (after, graphs)


def test_bench_compile_warms_up_every_row_before_timing(folder, monkeypatch):
    """bench's warm-up was 8 tokens of the first prompt: with --block 4 the rows' later blocks (and with
    --batch-size, the batch's shapes) compiled inside the timed runs. Now each row's warm-up is three blocks
    of the first batch, and nothing compiles between the last warm-up and the scoring of the outputs."""
    from twotower_cli import bench

    after = _compile_eagerly(monkeypatch)
    at_scoring: list[int] = []
    score = bench.sequence_log_likelihood

    def scored(*args):
        if not at_scoring:
            from torch._dynamo.utils import counters

            at_scoring.append(counters["stats"]["unique_graphs"])
        return score(*args)

    monkeypatch.setattr(bench, "sequence_log_likelihood", scored)
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "-n", "20", "--block", "4", "--thresholds",
                                       "0.8", "--repeat", "1", "--json", "--compile"])
    _graphs()
    assert r.exit_code == 0, r.output
    assert len(after) == 3 and after[-1] == at_scoring[0] > 0, (after, at_scoring)


def test_chat_and_serve_compile_warm_up_before_the_first_turn_or_request(folder, monkeypatch):
    from tests.test_serve import StoppedServer

    import twotower_cli.serve

    after = _compile_eagerly(monkeypatch)
    r = CliRunner().invoke(get_app(), ["chat", "--model", str(folder), "--block", "4", "-n", "8", "--compile"],
                           input="hello\n")
    assert r.exit_code == 0, r.output
    assert re.search(r"^warm-up \d+\.\d s: compiled the mask_diffusion steps$", r.stderr, re.M), r.stderr
    assert len(after) == 1 and after[0] > 0

    monkeypatch.setattr(twotower_cli.serve, "make_server", lambda *a, **kw: StoppedServer())
    from twotower_cli import sampler

    # (serve's warm-up is `sampler.warm_up` as chat's above, not run again here: it is recorded.) It warms up
    # for requests batched together: 2 rows (`sampler.warm_up` then runs one alone too), unless --max-batch 1
    rows = []
    monkeypatch.setattr(sampler, "warm_up", lambda backend, prompts, *a: rows.append(len(prompts)) or 0.0)
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--mode", "ar", "--compile"])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert re.match(r"warm-up \d+\.\d s: compiled the ar steps$", lines[0]) and lines[1].startswith("serving"), lines
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--mode", "ar", "--compile", "--max-batch", "1"])
    _graphs()
    assert r.exit_code == 0 and rows == [2, 1], (r.output, rows)


# ------------------------------------------------------------ whole sequences over compiled layers run eagerly

def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_serve_scores_prompts_eagerly_under_compile(folder):
    """`serve --compile` answered echo requests (lm-eval's loglikelihood: the prompt's log-probabilities) with
    one forward over the whole prompt through the compiled layers: each new prompt length compiled graphs
    (the Mamba layers' chunked scan branches on the length's chunks), a stall per request and, past dynamo's
    recompile limit, warnings. Scoring runs eagerly now, as bench's judging already did: no graph after the
    warm-up, and the log-probabilities of a server without --compile."""
    import torch
    from tests.test_serve import post

    from twotower_cli import sampler
    from twotower_cli.serve import Engine, in_background
    from twotower_cli.text import Tokenizer
    from twotower_cli.towers import load_model

    cfg = sampler.SamplingConfig(mode="ar", max_new_tokens=4)
    loaded = load_model(folder, need_denoiser=True)
    prompts = ["hello there", "the cat sat on the mat and looked at the dog", "A" * 90]

    def scores(backend) -> list[list[float]]:
        engine = Engine(backend, Tokenizer(folder), [2], cfg, "tiny-test")
        with in_background(engine) as base:
            answers = [post(base, "/v1/completions", {"prompt": p, "max_tokens": 0, "echo": True, "logprobs": 1})
                       for p in prompts]
        assert all(status == 200 for status, _ in answers), answers
        return [json.loads(text)["choices"][0]["logprobs"]["token_logprobs"][1:] for _, text in answers]

    plain = scores(TowerBackend(loaded.twotower))
    torch._dynamo.reset()
    backend = TowerBackend(loaded.twotower).compile(backend="eager")
    sampler.warm_up(backend, [[5, 6, 7]], cfg)
    before = _graph_count()
    compiled = scores(backend)
    during = _graph_count() - before
    torch._dynamo.reset()
    assert before > 0 and during == 0, (before, during)
    assert [len(c) for c in compiled] == [len(p) for p in plain]
    for c, p in zip(compiled, plain, strict=True):
        assert c == pytest.approx(p, abs=1e-5)


def test_a_second_backend_over_compiled_layers_reads_prompts_eagerly(folder):
    """`TowerBackend.compile` compiles the towers' layers in place, so every backend over them runs them
    compiled, but only the backend that compiled them knew to read prompts eagerly: a second one (scripts/
    gpu_check.py's chat rows read the conversation again with a fresh backend) compiled each new prompt
    length, 17 to 30 s a turn in `gpu_check.py --cpu-smoke --compile`. Whether the layers are compiled is
    now the towers' to say."""
    import torch

    from twotower_cli.towers import load_model

    loaded = load_model(folder, need_denoiser=True)
    torch._dynamo.reset()
    first = TowerBackend(loaded.twotower).compile(backend="eager")
    second = TowerBackend(loaded.twotower)
    g = torch.Generator().manual_seed(0)
    before = _graph_count()
    with torch.no_grad():
        for n in (7, 23, 41):
            second.reset(1)
            second.extend(torch.randint(4, 40, (1, n), generator=g))
    during = _graph_count() - before
    torch._dynamo.reset()
    assert first.compiled and second.compiled
    assert during == 0, during
