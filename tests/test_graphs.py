"""`TowerBackend.graphs` (`--cuda-graphs`): the denoiser step captured once per block and replayed, and the
context tower's one-token step captured over fixed-size key/value buffers. On this CPU the capture is a
stand-in with a CUDA graph's contract: a warm-up run (then `after_warmup`), and `replay()` runs the same step
again over the buffers it captured (the ids, t, validity and position the backend copies into them) and
writes the same output tensor. So these tests check everything but the capture itself: what is copied in,
when a graph is made, dropped and reused, that the cache after graphed steps is the eager one, and that
sampling gives what it gives without graphs. `test_kernels.py` has the CUDA tests of the real capture (`gpu`
marker)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from tests.twotower_helpers import write_random_twotower
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from twotower_cli import sampler as S
from twotower_cli import towers
from twotower_cli.batching import Continuous, run_in_order
from twotower_cli.chat import PrefixReuse, start_from
from twotower_cli.model import moe
from twotower_cli.ops import kernels
from twotower_cli.towers import TowerBackend, load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_random_twotower(tmp_path_factory.mktemp("tt") / "tt", (21, 22)),
                      need_denoiser=True).twotower


@pytest.fixture
def captured(monkeypatch):
    """Stand-in capture: the warm-up run, `after_warmup`, then the capture's one replay (the step runs again
    into what becomes the output tensor); each later replay runs it again into that tensor. Records the
    calls."""
    calls = []

    def capture(fn, device, after_warmup=None):
        fn()
        if after_warmup is not None:
            after_warmup()
        out = fn()
        calls.append(device)

        def replay():
            out.copy_(fn())
        return replay, out

    monkeypatch.setattr(towers, "capture_graph", capture)
    monkeypatch.setattr(towers, "GRAPH_DEVICES", {"cuda", "cpu"})
    return calls


class _Outside:
    """A tensor a recorded graph reads but does not own (an input, a buffer, a weight): its memory held weakly,
    as a CUDA graph holds only the addresses."""

    def __init__(self, t: torch.Tensor):
        self.ref = StorageWeakRef(t.untyped_storage())
        self.meta = (t.storage_offset(), t.shape, t.stride(), t.dtype)

    def get(self) -> torch.Tensor:
        assert not self.ref.expired(), "a replay reads memory that has been freed since the capture"
        offset, shape, stride, dtype = self.meta
        return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_with_weak_ptr(self.ref.cdata), offset,
                                                shape, stride)


class _Recorder(TorchDispatchMode):
    """The aten ops of one run, with the tensors they read and write: those made during the run are the
    graph's (kept), the others `_Outside`. A host read of a tensor's value raises, as it does in a capture."""

    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}
    HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        super().__init__()
        self.ops, self.owned = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNCS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func})")
        out = func(*args, **kwargs)
        read = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self.owned.update(t.untyped_storage()._cdata for t in tree_flatten(out)[0]
                          if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in read)

        def held(x):
            outside = isinstance(x, torch.Tensor) and x.untyped_storage()._cdata not in self.owned
            return _Outside(x) if outside else x
        self.ops.append((func, tree_map(held, args), tree_map(held, kwargs), tree_map(held, out)))
        return out

    def record(self, fn):
        saved = {name: getattr(torch.Tensor, name) for name in self.HOST_READS}

        def refuse(*_args, **_kwargs):
            raise RuntimeError("operation not permitted when stream is capturing (a host read)")
        try:
            for name in self.HOST_READS:
                setattr(torch.Tensor, name, refuse)
            with self:
                return fn()
        finally:
            for name, f in saved.items():
                setattr(torch.Tensor, name, f)

    @torch.no_grad()
    def replay(self) -> None:
        def get(x):
            return x.get() if isinstance(x, _Outside) else x
        for func, args, kwargs, out in self.ops:
            new = func(*tree_map(get, args), **tree_map(get, kwargs))
            for o, n in zip(tree_flatten(tree_map(get, out))[0], tree_flatten(new)[0], strict=True):
                if isinstance(o, torch.Tensor) and o.data_ptr() != n.data_ptr():
                    o.copy_(n)


@pytest.fixture
def recorded(monkeypatch):
    """A stand-in capture closer to CUDA's: the warm-up run and `after_warmup`, then `fn` runs once more while
    its aten ops are recorded (a host read of a value raises), whatever that run changed is undone with
    `after_warmup` (a capture runs nothing), and `replay()` runs the recorded ops again: the Python of the
    step ran once, at the capture, and a replay reads and writes the same memory, raising if memory it
    reads from outside the graph was freed since. The MoE layers take their grouped route (CUDA's in bf16:
    no host sync). Records the calls."""
    calls = []

    def capture(fn, device, after_warmup=None):
        fn()
        if after_warmup is not None:
            after_warmup()
        recorder = _Recorder()
        out = recorder.record(fn)
        if after_warmup is not None:
            after_warmup()
        recorder.replay()
        calls.append(device)
        return recorder.replay, out

    monkeypatch.setattr(towers, "capture_graph", capture)
    monkeypatch.setattr(towers, "GRAPH_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(moe, "CPU_ROWS_PER_GROUP", 10**6)
    return calls


def graphed(model) -> TowerBackend:
    b = TowerBackend(model)
    b.graphs = True
    return b


def test_steps_of_a_block_give_the_eager_logits(model, captured):
    """Within a block: the first step eager, the second captured, the rest replayed, every one with the logits
    the eager path gives for its ids, t and rows (the rows not asked for zero); a commit drops the graph
    and the next block captures anew at its second step."""
    eager, g = TowerBackend(model), graphed(model)
    prompt = torch.tensor([[5, 9, 14, 7, 22, 30], [11, 4, 8, 8, 19, 25]])
    gen = torch.Generator().manual_seed(0)
    for b in (eager, g):
        b.reset(2)
        b.extend(prompt)
    for block_no in range(2):
        x = torch.full((2, 4), 3)
        for step in range(4):
            t = torch.tensor([1.0 - step / 4, 0.75 - step / 8])
            rows = torch.rand(2, 4, generator=gen) < 0.7
            want = eager.denoise(x, t, rows=rows)
            got = g.denoise(x, t, rows=rows)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert g.captures == block_no + (step >= 1)
            x = x.clone()
            x[:, step] = torch.randint(4, 40, (2,), generator=gen)
        for b in (eager, g):
            b.extend(x)  # the block committed: the graph is stale
        assert g._graph is None
    assert captured == [model.denoiser_device] * 2


def test_returned_logits_are_not_overwritten_by_the_next_replay(model, captured):
    g = graphed(model)
    g.reset(1)
    g.extend(torch.tensor([[5, 9, 14]]))
    x = torch.full((1, 4), 3)
    outs = [g.denoise(x.clone(), torch.tensor([v])) for v in (1.0, 0.8, 0.6, 0.4)]
    eager = TowerBackend(model)
    eager.reset(1)
    eager.extend(torch.tensor([[5, 9, 14]]))
    for v, out in zip((1.0, 0.8, 0.6, 0.4), outs, strict=True):
        torch.testing.assert_close(out, eager.denoise(x, torch.tensor([v])), rtol=0, atol=0)


def test_a_new_shape_or_validity_starts_over(model, captured):
    """A block of another shape, or with `block_valid` where there was none, is a new key: eager first."""
    g = graphed(model)
    g.reset(1)
    g.extend(torch.tensor([[5, 9, 14]]))
    t = torch.tensor([1.0])
    g.denoise(torch.full((1, 4), 3), t)
    g.denoise(torch.full((1, 4), 3), t)
    assert g.captures == 1
    g.denoise(torch.full((1, 3), 3), t)  # another shape: eager, graph dropped
    assert g.captures == 1 and g._graph.replay is None
    valid = torch.tensor([[True, True, False]])
    g.denoise(torch.full((1, 3), 3), t, block_valid=valid)  # validity: another key again
    assert g.captures == 1 and g._graph.replay is None
    g.denoise(torch.full((1, 3), 3), t, block_valid=valid)
    assert g.captures == 2


@pytest.mark.parametrize("mode,policy", [("mask_diffusion", "topk"), ("mask_diffusion", "threshold"),
                                         ("mock_ar", "threshold"), ("ar", "threshold")])
def test_sampling_with_graphs_gives_the_same_tokens(model, captured, mode, policy, monkeypatch):
    """`S.run` on two prompts of different lengths (left pads): same tokens and NFE with graphs as without.
    mask_diffusion: the denoiser step of blocks 1 and 2 over the cache, of block 3 over the fixed-size
    buffers (made at the second commit) and replayed from then on, and the commit captured at the third; ar
    and mock_ar: the one-token step, over buffers made at the second step and remade once (mock_ar's
    denoiser step has no t and is never graphed)."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 8)
    cfg = S.SamplingConfig(mode=mode, block_size=4, steps=4, policy=policy, threshold=0.3, max_new_tokens=24)
    prompts = [[5, 9, 14, 7, 22, 30], [11, 4]]
    g = graphed(model)
    want = S.run(TowerBackend(model), prompts, cfg).generations
    got = S.run(g, prompts, cfg).generations
    assert [(x.token_ids, x.nfe) for x in got] == [(x.token_ids, x.nfe) for x in want]
    assert g.captures == (4 if mode == "mask_diffusion" else 2), g.captures


def test_continuous_batching_with_graphs_gives_the_same_tokens(model, captured):
    """Rows joining and leaving between blocks (each a cache change) and short last blocks right-padded
    (`block_valid`): the tokens of the run without graphs."""
    cfg = S.SamplingConfig(mode="mask_diffusion", block_size=4, steps=4, policy="topk", max_new_tokens=12)
    prompts = [[5, 9, 14, 7, 22, 30], [11, 4], [8, 8, 19, 25, 6], [20], [15, 16, 17, 18]]
    lengths = [12, 6, 9, 12, 5]

    def tokens(backend):
        return [gen.token_ids for _, gen, _ in run_in_order(Continuous(backend, cfg), prompts, width=3,
                                                             max_new=lengths)]
    g = graphed(model)
    assert tokens(g) == tokens(TowerBackend(model))
    assert g.captures > 0


def capturing_with(capture, model, monkeypatch) -> tuple[TowerBackend, TowerBackend]:
    """(with graphs, eager) backends after the same 3-token prompt, `capture` standing in for the capture."""
    monkeypatch.setattr(towers, "capture_graph", capture)
    monkeypatch.setattr(towers, "GRAPH_DEVICES", {"cuda", "cpu"})
    g, eager = graphed(model), TowerBackend(model)
    for b in (g, eager):
        b.reset(1)
        b.extend(torch.tensor([[5, 9, 14]]))
    return g, eager


def test_a_failed_capture_warns_once_and_goes_on_eagerly(model, monkeypatch):
    def refuse(fn, device, after_warmup=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    g, eager = capturing_with(refuse, model, monkeypatch)
    x, t = torch.full((1, 4), 3), torch.tensor([1.0])
    g.denoise(x, t)
    with pytest.warns(UserWarning, match="capture of the denoiser step failed"):
        got = g.denoise(x, t)
    torch.testing.assert_close(got, eager.denoise(x, t), rtol=0, atol=0)
    assert not g.graphs and g.captures == 0


@pytest.mark.parametrize("command", [["generate", "hello", "-n", "4"], ["bench", "-n", "4"]])
def test_cuda_graphs_without_a_gpu_is_one_error_line(command):
    """`--cuda-graphs` with the denoiser on the CPU: one Error line with the way out, exit 1, before loading."""
    from typer.testing import CliRunner

    from twotower_cli.cli import get_app

    r = CliRunner().invoke(get_app(), [*command, "--device", "cpu", "--cuda-graphs"])
    assert r.exit_code == 1, r.output
    assert r.stderr.splitlines() == ["Error: --cuda-graphs needs a tower on a GPU; both would run on cpu (hint: use "
                                     "--device cuda (or --context-device / --denoiser-device cuda:N), or drop "
                                     "--cuda-graphs)"]


def test_cuda_graphs_help_names_what_is_replayed_in_every_command():
    """Every command with --cuda-graphs (the README: generate, chat, serve, bench) says the same of it, and
    names what the backend replays: decode steps and block commits
    (test_only_decode_steps_and_commits_of_a_block_width_are_captured), denoiser steps past a block's end
    (test_denoiser_graph_outlives_commits_once_the_context_is_in_buffers), kept per batch size
    (test_buffers_are_kept_per_batch_size). It said "within each block" and left the commits out."""
    import typer.main

    from twotower_cli.cli import get_app

    commands = typer.main.get_command(get_app()).commands
    helps = {name: p.help for name, c in commands.items() for p in c.params if p.name == "cuda_graphs"}
    assert set(helps) == {"generate", "chat", "serve", "bench"}
    (text,) = set(helps.values())
    for said in ("decode steps", "block commits", "denoiser steps", "across blocks", "per batch size"):
        assert said in text, (said, text)
    assert "within each block" not in text


def assert_same_cache(got: towers.TowerCache, want: towers.TowerCache, atol: float = 1e-6) -> None:
    assert got.length == want.length
    assert (got.key_mask is None) == (want.key_mask is None)
    if want.key_mask is not None:
        assert torch.equal(got.key_mask, want.key_mask)
    for a, b in zip(got.layers, want.layers, strict=True):
        if isinstance(b, towers.KVCache):
            assert a.k.shape == b.k.shape
            torch.testing.assert_close(a.k, b.k, rtol=0, atol=atol)
            torch.testing.assert_close(a.v, b.v, rtol=0, atol=atol)
        elif isinstance(b, towers.MambaState):
            torch.testing.assert_close(a.conv, b.conv, rtol=0, atol=atol)
            torch.testing.assert_close(a.ssm, b.ssm, rtol=0, atol=atol)


@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit", "sdpa"])
@pytest.mark.parametrize("pads", [False, True])
def test_decode_steps_give_the_eager_logits_and_cache(model, captured, monkeypatch, pads, sdpa):
    """One-token context steps: the first eager, the second over new buffers holding the cache's keys and
    values, the third captured, the rest replayed, and the buffers doubled (captured again) when full. Every step's logits, and
    the cache after it (K/V, key mask, Mamba states, length), are the eager path's; so is a denoiser block
    read from the cache afterwards, and `state()` / `restore`. A prompt extension drops the buffers. Both
    attention paths: the CPU's explicit one and SDPA's (CUDA's: the mask over the buffer as an additive
    mask, the grouped heads packed)."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 4)
    monkeypatch.setitem(kernels._forced, "sdpa", sdpa)
    eager, g = TowerBackend(model), graphed(model)
    prompt = torch.tensor([[5, 9, 14, 7, 22, 30], [0, 0, 11, 4, 8, 19]])
    mask = torch.tensor([[True] * 6, [False, False] + [True] * 4]) if pads else None
    for b in (eager, g):
        b.reset(2)
        b.extend(prompt, attention_mask=mask)
    gen = torch.Generator().manual_seed(1)
    captures = []
    for _ in range(30):  # 6 + 30 tokens: buffers of 16 columns made at the second step (twice the 8 it
        # needs), then 34 and 70; with each, the step is run once, then captured, then replayed
        tok = torch.randint(4, 40, (2, 1), generator=gen)
        torch.testing.assert_close(g.extend(tok), eager.extend(tok), rtol=0, atol=1e-5)
        assert_same_cache(g.cache, eager.cache)
        captures.append(g.captures)
    assert captures[:4] == [0, 0, 1, 1] and g.captures == 3 and g._static.capacity == 70
    x, t = torch.full((2, 4), 3), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(g.denoise(x, t), eager.denoise(x, t), rtol=0, atol=1e-5)
    saved = g.state()
    tok = torch.tensor([[7], [8]])
    first = g.extend(tok)
    g.restore(saved)
    assert g._static is None  # a restored cache is another cache
    torch.testing.assert_close(g.extend(tok), first, rtol=0, atol=1e-5)  # eager now: keys not padded
    g.extend(torch.randint(4, 40, (2, towers.STATIC_MAX_TOKENS + 1), generator=gen))  # a prompt: eager
    assert g._static is None and not g._armed


def test_a_failed_decode_capture_leaves_the_states_and_goes_on_eagerly(model, monkeypatch):
    """A capture that fails after its warm-up ran (advancing the Mamba states in place): the states are put
    back, one warning, and the step and the ones after it are the eager path's."""
    def fail_after_warmup(fn, device, after_warmup=None):
        fn()
        raise RuntimeError("operation not permitted when stream is capturing")

    g, eager = capturing_with(fail_after_warmup, model, monkeypatch)
    for i, tok in enumerate(([[7]], [[8]], [[9]], [[10]], [[11]])):
        want = eager.extend(torch.tensor(tok))
        if i == 2:
            with pytest.warns(UserWarning, match="capture of a context step failed"):
                got = g.extend(torch.tensor(tok))
        else:
            got = g.extend(torch.tensor(tok))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert_same_cache(g.cache, eager.cache)
    assert not g.graphs and g.captures == 0


@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit", "sdpa"])
def test_denoiser_graph_outlives_commits_once_the_context_is_in_buffers(model, captured, monkeypatch, sdpa):
    """mask_diffusion's pattern: denoiser steps, then a commit of the block. Blocks 0 and 1 graph their steps
    over the cache (a capture each, dropped at the commit); the second commit makes the fixed-size buffers,
    block 2 captures its step over them, the third commit is captured, and from then on the denoiser graph
    and the commit graph are replayed with no new capture. Every logit is the eager path's, with either
    attention path."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 8)
    monkeypatch.setitem(kernels._forced, "sdpa", sdpa)
    eager, g = TowerBackend(model), graphed(model)
    prompt = torch.tensor([[5, 9, 14, 7, 22, 30], [11, 4, 8, 8, 19, 25]])
    for b in (eager, g):
        b.reset(2)
        b.extend(prompt)
    gen = torch.Generator().manual_seed(3)
    after_steps = []
    for _ in range(5):
        x = torch.full((2, 4), 3)
        for step in range(3):
            t = torch.tensor([1.0 - step / 3, 0.9 - step / 4])
            torch.testing.assert_close(g.denoise(x, t), eager.denoise(x, t), rtol=0, atol=1e-5)
            x = x.clone()
            x[:, step] = torch.randint(4, 40, (2,), generator=gen)
        after_steps.append(g.captures)
        x[:, 3] = torch.randint(4, 40, (2,), generator=gen)
        torch.testing.assert_close(g.extend(x), eager.extend(x), rtol=0, atol=1e-5)
        assert_same_cache(g.cache, eager.cache)
    assert after_steps == [1, 2, 3, 4, 4] and g.captures == 4
    assert g._static is not None and list(g._static.blocks) == [((2, 4), False)] and g._graph is None


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_a_second_run_replays_what_the_first_captured(model, captured, monkeypatch, mode):
    """`S.run` twice on one backend (as `bench` and `--prompt-file` do), the same batch size and other prompts:
    the second run's cache goes into the first run's buffers right after its prompt, so it captures
    nothing, and gives the tokens it gives without graphs."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 8)
    cfg = S.SamplingConfig(mode=mode, block_size=4, steps=4, policy="topk", max_new_tokens=16)
    g = graphed(model)
    S.run(g, [[5, 9, 14, 7, 22, 30], [11, 4]], cfg)
    first = g.captures
    prompts = [[8, 8, 19], [20, 6, 15, 16, 17]]
    got = S.run(g, prompts, cfg).generations
    want = S.run(TowerBackend(model), prompts, cfg).generations
    assert [x.token_ids for x in got] == [x.token_ids for x in want]
    assert first > 0 and g.captures == first


def test_a_cache_set_aside_keeps_its_values_when_the_buffers_take_another(model, captured, monkeypatch):
    """`aside` (continuous batching's join) holds the batch's cache while new rows are read into a fresh one
    of the same size: the buffers the held cache lived in are handed to the new rows, so the held cache
    must have been given tensors of its own first. After the join every row's logits are those of the same
    steps without graphs."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 8)
    eager, g = TowerBackend(model), graphed(model)
    for b in (eager, g):
        b.reset(1)
        b.extend(torch.tensor([[5, 9, 14, 7]]))
        for tok in (22, 30, 11):  # eager, into the buffers, captured
            b.extend(torch.tensor([[tok]]))
    assert g._static is not None
    for b in (eager, g):
        with b.aside():
            b.reset(1)
            b.extend(torch.tensor([[4, 8, 8, 19, 25, 6]]))  # a prompt read into the spare buffers
            b.extend(torch.tensor([[20]]))
    assert_same_cache(g.cache, eager.cache)
    for tok in ([[15], [16]], [[17], [18]], [[19], [21]]):
        torch.testing.assert_close(g.extend(torch.tensor(tok)), eager.extend(torch.tensor(tok)), rtol=0, atol=1e-5)


def test_buffers_are_kept_per_batch_size(model, captured, monkeypatch):
    """Runs of 2, 1 and again 2 prompts (a server's batch changes size): the third finds the buffers and
    graphs of the first and captures nothing; with one size kept (SPARE_BATCH_SIZES = 1) it captures again."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 8)
    cfg = S.SamplingConfig(mode="mask_diffusion", block_size=4, steps=4, policy="topk", max_new_tokens=16)
    for kept, recaptures in ((8, False), (1, True)):
        monkeypatch.setattr(towers, "SPARE_BATCH_SIZES", kept)
        g = graphed(model)
        S.run(g, [[5, 9, 14, 7], [11, 4]], cfg)
        S.run(g, [[8, 19, 25]], cfg)
        before = g.captures
        got = S.run(g, [[20, 6, 15], [16, 17]], cfg).generations
        assert [x.token_ids for x in got] == [x.token_ids for x in
                                              S.run(TowerBackend(model), [[20, 6, 15], [16, 17]], cfg).generations]
        assert (g.captures > before) == recaptures


def test_the_recording_stand_in_refuses_host_reads_and_reads_of_freed_memory(recorded):
    """The stand-in itself: a replay reads its inputs' memory as it is then; a host read in the captured step
    raises; a replay after an input was freed raises."""
    x = {"a": torch.randn(4), "w": torch.randn(4)}
    replay, out = towers.capture_graph(lambda: x["a"] * x["w"] + 1, torch.device("cpu"))
    x["a"].fill_(1.0)
    replay()
    assert torch.equal(out, x["w"] + 1)
    with pytest.raises(RuntimeError, match="host read"):
        towers.capture_graph(lambda: x["a"] * (2 if bool(x["a"].sum() > 0) else 1), torch.device("cpu"))
    del x["a"]
    with pytest.raises(AssertionError, match="freed"):
        replay()


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar", "mock_ar"])
def test_sampling_and_continuous_batching_under_a_recorded_capture(model, recorded, monkeypatch, mode):
    """`S.run` twice (the second replays the first's graphs) and a continuous batch (rows joining and
    leaving, short blocks right-padded) with captures that replay only what the capture recorded: the tokens
    of the runs without graphs, and no capture refused."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 8)
    cfg = S.SamplingConfig(mode=mode, block_size=4, steps=4, policy="topk", max_new_tokens=12)
    prompts = [[5, 9, 14, 7, 22, 30], [11, 4], [8, 8, 19, 25, 6], [20], [15, 16, 17, 18]]

    def tokens(backend):
        with torch.no_grad():
            runs = [S.run(backend, prompts[:2], cfg).generations, S.run(backend, prompts[2:4], cfg).generations]
        got = [g.token_ids for run in runs for g in run]
        return got + [gen.token_ids for _, gen, _ in run_in_order(Continuous(backend, cfg), prompts, width=3,
                                                                   max_new=[12, 6, 9, 12, 5])]
    g = graphed(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tokens(g)
    assert got == tokens(TowerBackend(model))
    assert len(recorded) == g.captures > 0


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_chat_turns_with_graphs_capture_and_give_the_tokens_without(model, recorded, monkeypatch, mode):
    """A chat's turns through `PrefixReuse` (`start_from` brings the cache to a history outside the sampler,
    from a snapshot or from scratch; the live state goes on where it fits): with graphs, no capture refused
    (a history read under autograd took the MoE layers' host-synchronising route into the capture and ended
    graphs for the session) and the tokens of the same turns without graphs."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 8)
    cfg = S.SamplingConfig(mode=mode, block_size=4, steps=4, policy="topk", max_new_tokens=8)

    def turns(backend):
        reuse, outs, history = PrefixReuse(backend, keep=2), [], [5, 9, 14]
        for i in range(5):
            prompt = history + [20 + i, 21, 22 + i]
            start_from(reuse, prompt, history)
            with torch.no_grad():
                outs.append(S.run(reuse, [prompt], cfg).generations[0].token_ids)
            # the next history: this turn with part of its reply (a template that drops some), or at the
            # third turn another conversation's
            history = prompt + outs[-1][:3] + [7] if i != 2 else [5, 9, 14]
        return outs
    g = graphed(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = turns(g)
    assert got == turns(TowerBackend(model))
    assert g.graphs and g.captures > 0


def test_a_cache_nobody_holds_is_not_copied_out_of_the_buffers(model, captured, monkeypatch):
    """`reset`, `restore` and `keep_rows` replace a cache that lives in the buffers: where nothing else holds
    it, its keys, values and states are not copied out first (a whole cache's worth of memory and copying,
    on a GPU at every new batch, restored turn and row leaving a server's batch, only to be dropped); one
    that is held (`aside`) still gets its own. The steps after are the eager path's."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 8)
    eager, g = TowerBackend(model), graphed(model)
    prompt = torch.tensor([[5, 9, 14, 7], [11, 4, 8, 19]])

    def decode(backends, toks):
        for tok in toks:
            torch.testing.assert_close(*(b.extend(torch.tensor(tok)) for b in backends), rtol=0, atol=1e-5)

    def no_copies(*_args, **_kwargs):
        raise AssertionError("a cache nobody holds was copied")
    for b in (eager, g):
        b.reset(2)
        b.extend(prompt)
    decode((g, eager), ([[22], [30]], [[11], [12]]))
    saved = [b.state() for b in (g, eager)]
    assert g._static is not None
    with monkeypatch.context() as m:
        m.setattr(towers.MambaState, "clone", no_copies)
        m.setattr(torch.Tensor, "clone", no_copies)
        g.keep_rows([1])
    eager.keep_rows([1])
    decode((g, eager), ([[13]], [[14]], [[15]]))
    for b, state in zip((g, eager), saved, strict=True):
        b.restore(state)
    decode((g, eager), ([[16], [17]], [[18], [19]]))
    with monkeypatch.context() as m:
        m.setattr(towers.MambaState, "clone", no_copies)
        m.setattr(torch.Tensor, "clone", no_copies)
        g.reset(2)
    eager.reset(2)
    for b in (g, eager):
        b.extend(prompt)
    decode((g, eager), ([[20], [21]], [[22], [23]]))
    assert g.captures > 0


@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit", "sdpa"])
def test_what_a_former_cache_left_in_the_buffers_cannot_reach_the_next(model, captured, monkeypatch, sdpa):
    """Buffers taken over from a cache that left them keep its keys and values past the new cache's length,
    masked: a masked key weighs 0, but 0 · inf is NaN, so an inf or NaN the former cache held there (a
    float16 overflow) would reach every later cache in them. They are cleared when a cache takes them."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 16)
    monkeypatch.setitem(kernels._forced, "sdpa", sdpa)
    eager, g = TowerBackend(model), graphed(model)
    for b in (eager, g):
        b.reset(1)
        b.extend(torch.tensor([[5, 9, 14, 7]]))
        for tok in (20, 30):  # eager, then into the buffers
            b.extend(torch.tensor([[tok]]))
    for k, v in g._static.kv.values():  # what the former cache left past its columns
        k[:, :, 8:].fill_(float("inf"))
        v[:, :, 8:].fill_(float("nan"))
    for b in (eager, g):
        b.reset(1)
        b.extend(torch.tensor([[11, 4]]))  # into the spare buffers
    for tok in (21, 22, 23):
        torch.testing.assert_close(g.extend(torch.tensor([[tok]])), eager.extend(torch.tensor([[tok]])), rtol=0,
                                   atol=1e-5)
    x, t = torch.full((1, 4), 3), torch.tensor([0.5])
    torch.testing.assert_close(g.denoise(x, t), eager.denoise(x, t), rtol=0, atol=1e-5)


def test_each_capture_runs_on_a_stream_of_the_device_it_is_given(monkeypatch):
    """`capture_graph` against a model of torch.cuda's streams: `torch.cuda.graph` without a stream captures on
    one stream per process, made on the device that was current at the first capture, and entering it makes
    that device current. With the towers on two GPUs (--context-device, --denoiser-device) the second
    device's steps were captured on the first device's stream: their kernels ran on their own device's
    stream, outside the capture, so the graph recorded nothing (its replays left the outputs as they were)
    or the capture failed. Each capture now warms up and captures on a stream of the device it is given."""
    current = {"device": 0}
    captures = []

    class Stream:
        def __init__(self):
            self.device = current["device"]

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def on(device=None, stream=None):
        before = current["device"]
        current["device"] = stream.device if stream is not None else torch.device(device).index
        try:
            yield
        finally:
            current["device"] = before

    class Graph:
        def replay(self):
            pass

    class graph:  # torch.cuda.graph
        default_capture_stream = None

        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            if stream is None and graph.default_capture_stream is None:
                graph.default_capture_stream = Stream()
            self.stream = stream if stream is not None else graph.default_capture_stream
            self.ctx = on(stream=self.stream)

        def __enter__(self):
            self.ctx.__enter__()
            captures.append(self.stream.device)

        def __exit__(self, *exc):
            self.ctx.__exit__(*exc)

    cuda = torch.cuda
    for name, value in (("device", lambda d: on(device=d)), ("stream", lambda s: on(stream=s)), ("Stream", Stream),
                        ("current_stream", lambda device=None: Stream()), ("CUDAGraph", Graph), ("graph", graph)):
        monkeypatch.setattr(cuda, name, value)
    for device in ("cuda:1", "cuda:0", "cuda:1"):  # the denoiser's step, a context step, the denoiser's
        towers.capture_graph(lambda: torch.zeros(1), torch.device(device))
    assert captures == [1, 0, 1]


def test_only_decode_steps_and_commits_of_a_block_width_are_captured(model, captured, monkeypatch):
    """Context steps of other lengths (chat turns, a server's continuations) run over the buffers but are not
    captured, however often their length comes; once the denoiser has seen blocks of that width (commits),
    the length is captured at its next two steps. Logits as without graphs throughout."""
    monkeypatch.setattr(towers, "STATIC_MIN_CAPACITY", 64)  # no growth (a new capture) within the test
    eager, g = TowerBackend(model), graphed(model)
    for b in (eager, g):
        b.reset(1)
        b.extend(torch.tensor([[5, 9, 14, 7]]))
    gen = torch.Generator().manual_seed(4)

    def step(width: int) -> None:
        ids = torch.randint(4, 40, (1, width), generator=gen)
        torch.testing.assert_close(g.extend(ids), eager.extend(ids), rtol=0, atol=1e-5)

    for _ in range(4):
        step(3)
    assert g._static is not None and g.captures == 0
    x, t = torch.full((1, 3), 3), torch.tensor([1.0])
    torch.testing.assert_close(g.denoise(x, t), eager.denoise(x, t), rtol=0, atol=1e-5)  # a block of width 3
    step(3)
    assert g.captures == 0
    step(3)
    assert g.captures == 1


def test_a_capture_that_fails_raises_its_cause_with_the_callers_stream_current(monkeypatch):
    """`capture_graph` through torch's own `torch.cuda.graph` over a model of CUDA streams and stream capture:
    an operation that is not capture-safe (a host read) raises inside the capture and invalidates it, and
    ending an invalidated capture raises too (cudaErrorStreamCaptureInvalidated). torch.cuda.graph ends the
    capture before it restores the stream, so that second error replaced the first (the warning of
    `TowerBackend._no_graphs` named no operation) and the capture stream stayed current for the eager run
    that follows. Now the step's own error comes out and the caller's stream is current again; a capture
    that works is unchanged."""
    class Stream:
        def wait_stream(self, other):
            pass

    default = Stream()
    state = {"current": default, "capturing": False, "invalid": False}

    class StreamContext:  # torch.cuda.stream (torch.cuda.graph enters and exits its own by hand)
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            self.before, state["current"] = state["current"], self.stream

        def __exit__(self, *exc):
            state["current"] = self.before

    class Graph:  # torch.cuda.CUDAGraph
        def capture_begin(self, *pool, **options):
            state["capturing"], state["invalid"] = True, False

        def capture_end(self):
            state["capturing"] = False
            if state["invalid"]:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        def replay(self):
            pass

    def step_with_a_host_read():
        if state["capturing"]:
            state["invalid"] = True
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return torch.zeros(1)

    cuda = torch.cuda
    for name, value in (("device", lambda d: contextlib.nullcontext()), ("stream", StreamContext),
                        ("Stream", Stream), ("current_stream", lambda device=None: state["current"]),
                        ("CUDAGraph", Graph), ("synchronize", lambda device=None: None),
                        ("empty_cache", lambda: None)):
        monkeypatch.setattr(cuda, name, value)
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        towers.capture_graph(step_with_a_host_read, torch.device("cuda", 0))
    assert state["current"] is default
    replay, out = towers.capture_graph(lambda: torch.ones(2), torch.device("cuda", 0))
    assert state["current"] is default and torch.equal(out, torch.ones(2)) and replay is not None


@pytest.mark.parametrize("mode", ["ar", "mask_diffusion"])
def test_compiled_steps_over_growing_buffers_compile_nothing_after_the_warm_up(tmp_path, captured, mode):
    """--compile with --cuda-graphs: the steps over the fixed-size buffers read the cache's keys and values as
    views of buffers whose capacity doubles when they are full, so their strides change with the capacity
    (and differ from an eager step's). With dynamic shapes dynamo keeps strides symbolic: once the warm-up
    has run, a run that outgrows the first buffers (256 columns, then 2 × 257) compiles nothing more, and
    gives the tokens of the uncompiled, ungraphed run. (The compile with dynamo's eager backend: see
    test_compile_flag.py.)"""
    from torch._dynamo.utils import counters

    model = load_model(write_random_twotower(tmp_path / "tt", (23, 24)), need_denoiser=True).twotower
    cfg = S.SamplingConfig(mode=mode, block_size=4, steps=2, policy="topk", max_new_tokens=270)
    prompt = [[5, 9, 11, 4, 7]]
    plain = S.run(TowerBackend(model), prompt, cfg, []).generations[0].token_ids
    torch._dynamo.reset()
    counters.clear()
    backend = TowerBackend(model).compile(backend="eager")
    backend.graphs = True
    S.warm_up(backend, prompt, cfg)
    graphs, captures = counters["stats"]["unique_graphs"], backend.captures
    got = S.run(backend, prompt, cfg, []).generations[0].token_ids
    after = counters["stats"]["unique_graphs"] - graphs
    torch._dynamo.reset()
    assert graphs > 0 and after == 0, (graphs, after)
    held = [s for s in (backend._static, *backend._spares.values()) if s is not None]
    assert backend.captures > captures and max(s.capacity for s in held) > 256
    assert got == plain
