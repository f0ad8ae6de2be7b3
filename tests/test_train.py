"""`twotower train` (issue 6, spec §8) on tiny random TwoTower checkpoints.

- the one-pass training forward (context tower once, all noisy blocks together) equals the sampler's
  per-block `TwoTower.denoise`, with random time conditioning and a denoiser unlike the context tower;
- the scan's block-boundary states equal the token-by-token recurrence;
- noise, packing, data order: the contracts in `train.py`'s docstring;
- 20 steps over a repeated text lower the eval loss; the context tower comes back byte-identical and every
  tensor keeps its dtype; `--train time-conditioning` touches nothing else;
- a run stopped at step 5 and resumed gives the losses and weights of an uninterrupted run;
- bad inputs give one `Error:` line and exit code 1;
- (slow) 2 DDP processes under torchrun equal 1 process with --grad-accum 2; so do 2 FSDP processes
  (`--fsdp`), which hold half of each tower each and resume exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tests.twotower_helpers import (
    fed_through_a_pipe,
    random_base,
    tiny_cfg,
    with_nan,
    write_base,
    write_twotower,
)
from typer.testing import CliRunner

from twotower_cli import train as T
from twotower_cli.checkpoint import open_checkpoint
from twotower_cli.cli import get_app
from twotower_cli.errors import TwoTowerError
from twotower_cli.ops.ssd import ssd_chunked, ssd_sequential
from twotower_cli.towers import load_model

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny TwoTower (block 4 in its config) whose denoiser differs from its context tower."""
    cfg = tiny_cfg()
    root = tmp_path_factory.mktemp("train")
    return write_twotower(root / "tt", random_base(cfg, seed=3), time_conditioning="random",
                          denoiser=random_base(cfg, seed=4))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


def run(cfg_dir: Path, data: Path, out: Path, steps: int = 20, **kw) -> T.TrainResult:
    cfg = T.TrainConfig(checkpoint=cfg_dir, data=[data], out=out, block=4, seq_len=32, batch=4, lr=3e-3,
                        steps=steps, warmup=2, eval_every=0, save_every=0, device="cpu", **kw)
    return T.train(cfg)


# ---------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("block", [3, 4, 16])
def test_batched_forward_equals_per_block_denoise(ckpt, block):
    """Block sizes below, at and above the config's chunk_size (8), one that does not divide it."""
    model = load_model(ckpt, need_denoiser=True).twotower
    B, nb = 2, 48 // block
    L = nb * block
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.cfg.vocab_size, (B, L), generator=gen)
    noisy, mask, t = T.add_noise(ids, block, 3, gen)
    assert t.shape == (B, nb) and (t > 0).all()
    with torch.no_grad():
        batched = T.BlockDenoiser(model).logits(noisy, t, T.context_pass(model.context_tower, ids, block))
        for b in range(nb):
            cache = model.context_tower.make_cache(B)
            if b:
                model.context_tower(ids[:, : b * block], cache=cache)
            ref = model.denoise(noisy[:, b * block:(b + 1) * block], cache, t[:, b])
            diff = (batched[:, b * block:(b + 1) * block] - ref).abs().max().item()
            assert diff <= 1e-5, f"block {b} of {nb} (S={block}): max diff {diff:.3g}"


def test_gradient_checkpointing_same_gradients_far_fewer_saved_activations(ckpt):
    """Recomputing each layer in backward gives the same loss and gradients; what autograd keeps for backward
    (counted by a saved-tensors hook) shrinks to the layers' inputs."""
    _, source, cfg = T.open_twotower(ckpt)
    model = T.load_for_training(source, cfg, "all", torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.cfg.vocab_size, (2, 64), generator=gen)
    noisy, mask, t = T.add_noise(ids, 4, 3, gen)
    context = T.context_pass(model.context_tower, ids, 4)
    runs = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        saved = [0]

        def pack(x, saved=saved):
            saved[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = T.BlockDenoiser(model, checkpointing)(noisy, t, context, ids, mask)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((loss.item(), grads, saved[0]))
    (loss0, grads0, saved0), (loss1, grads1, saved1) = runs
    assert loss0 == loss1 and grads0.keys() == grads1.keys()
    assert all(torch.allclose(grads0[n], grads1[n], rtol=0, atol=1e-7) for n in grads0)
    assert saved1 < saved0 / 3, (saved0, saved1)


@pytest.mark.parametrize("every,chunk", [(4, 8), (8, 4), (6, 4), (5, 5)])
def test_scan_states_at_block_boundaries(every, chunk):
    """Block states read off the chunked scan equal the recurrence run up to each block boundary."""
    gen = torch.Generator().manual_seed(1)
    b, h, p, g, n = 2, 4, 3, 2, 5
    L = 4 * every
    x = torch.randn(b, L, h, p, generator=gen)
    B, C = torch.randn(b, L, g, n, generator=gen), torch.randn(b, L, g, n, generator=gen)
    dt, A = torch.rand(b, L, h, generator=gen) * 0.3, -torch.rand(h, generator=gen) * 4 - 0.5
    init = torch.randn(b, h, p, n, generator=gen)
    y, final, states = ssd_chunked(x, dt, A, B, C, chunk, init, state_every=every)
    y_ref, final_ref = ssd_sequential(x, dt, A, B, C, chunk, init)
    assert states.shape == (b, L // every, h, p, n)
    assert (y - y_ref).abs().max() <= 1e-5 and (final - final_ref).abs().max() <= 1e-5
    for j in range(L // every):
        ref = init if j == 0 else ssd_sequential(x[:, : j * every], dt[:, : j * every], A, B[:, : j * every],
                                                 C[:, : j * every], chunk, init)[1]
        assert (states[:, j] - ref).abs().max() <= 1e-5, f"state before position {j * every}"


def test_noise_masks_at_least_one_per_block_and_reports_the_fraction():
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(4 * 64).view(4, 64) + 10
    noisy, mask, t = T.add_noise(ids, 8, 3, gen)
    blocks = mask.view(4, 8, 8)
    assert blocks.any(-1).all()
    assert torch.equal(t, blocks.float().mean(-1))
    assert torch.equal(noisy[mask], torch.full((int(mask.sum()),), 3)) and torch.equal(noisy[~mask], ids[~mask])
    again = T.add_noise(ids, 8, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], mask)
    many = T.add_noise(torch.zeros(512, 16, dtype=torch.long) + 5, 16, 3, gen)[2]
    assert 0.4 < many.mean().item() < 0.6  # t ~ U[1e-3, 1]: half the tokens masked on average


def test_block_attention_mask():
    m = T.block_attention_mask(6, 2)
    assert m.shape == (6, 12)
    assert m[0].tolist() == [False] * 6 + [True, True, False, False, False, False]
    assert m[5].tolist() == [True] * 4 + [False] * 2 + [False] * 4 + [True, True]


# ---------------------------------------------------------------------------------------------- data

def test_data_packing_jsonl_eos_and_held_out_slice(ckpt, tmp_path):
    from twotower_cli.text import Tokenizer

    (tmp_path / "a.jsonl").write_text('{"text": "ab"}\n\n{"text": "cd"}\n')
    (tmp_path / "b.txt").write_text("ef")
    tok = Tokenizer(ckpt)
    d = T.load_data([tmp_path / "a.jsonl", tmp_path / "b.txt"], tok, 2, eos=2, vocab_size=48)
    a, b, c, dd, e, f = (tok.encode(ch)[0] for ch in "abcdef")
    stream = [a, b, 2, c, dd, 2, e, f]
    assert torch.equal(torch.cat([d.train[:], d.eval]).flatten(), torch.tensor(stream))
    assert len(d.eval) == 1 and d.tokens == 8 and d.documents == 3
    order = T.TrainOrder(len(d.train), seed=0, batch=2, slots=1)
    seen = torch.cat([order.indices(s, 0) for s in range(3)])
    assert sorted(seen[:3].tolist()) == [0, 1, 2]  # one epoch is a permutation
    assert torch.equal(seen, torch.cat([T.TrainOrder(3, 0, 2, 1).indices(s, 0) for s in range(3)]))



def test_tokenize_then_training_on_the_npy_equals_training_on_the_text(ckpt, data, tmp_path):
    """`twotower tokenize` writes the stream `train` builds from the same files, so a run on the memory-mapped
    .npy gives the losses and weights of a run on the text, exactly."""
    r = CliRunner().invoke(get_app(), ["tokenize", str(ckpt), "--data", str(data), "-o", str(tmp_path / "c.npy"),
                                       "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    stream = np.load(tmp_path / "c.npy")
    assert info["documents"] == 1 and info["tokens"] == len(stream) and stream.dtype == np.uint16
    from twotower_cli.text import Tokenizer

    assert stream.tolist() == Tokenizer(ckpt).encode(TEXT)
    a = run(ckpt, data, tmp_path / "text", steps=3)
    b = run(ckpt, tmp_path / "c.npy", tmp_path / "npy", steps=3)
    assert a.losses == b.losses and a.eval_loss_after == b.eval_loss_after
    ta, tb = tensors(tmp_path / "text"), tensors(tmp_path / "npy")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_token_file_of_another_vocabulary_is_refused(ckpt, data, tmp_path):
    """tokenize records the vocabulary's fingerprint beside the .npy; a checkpoint whose tokenizer maps ids to
    other tokens (two swapped here) refuses it, in one line, before training."""
    r = CliRunner().invoke(get_app(), ["tokenize", str(ckpt), "--data", str(data), "-o", str(tmp_path / "c.npy")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "c.meta.json").read_text())
    from twotower_cli.text import Tokenizer

    assert meta["tokenizer"] == Tokenizer(ckpt).fingerprint() and meta["tokens"] == len(np.load(tmp_path / "c.npy"))
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    r = CliRunner().invoke(get_app(), ["train", str(other), "--data", str(tmp_path / "c.npy"), "-o", str(tmp_path / "o"),
                                       "--block", "4", "--seq-len", "32", "--steps", "1", "--device", "cpu"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "tokenized with another vocabulary" in lines[0], r.output
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(tmp_path / "c.npy"), "-o", str(tmp_path / "o"),
                                       "--block", "4", "--seq-len", "32", "--steps", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output


def test_npy_streams_give_sequences_that_never_cross_files(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(10, dtype=np.uint32))
    np.save(tmp_path / "b.npy", np.arange(100, 107, dtype=np.uint16))
    d = T.load_data([tmp_path / "a.npy", tmp_path / "b.npy"], None, 3, eos=2, vocab_size=200)
    got = torch.cat([d.train[:], d.eval]).tolist()
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [100, 101, 102], [103, 104, 105]]
    assert len(d.eval) == 1 and d.tokens == 17 and d.documents is None
    assert d.train[torch.tensor([3, 0])].tolist() == [[100, 101, 102], [0, 1, 2]]



def test_eval_data_is_held_out_instead_of_the_tail(ckpt, data, tmp_path):
    from twotower_cli.text import Tokenizer

    tok = Tokenizer(ckpt)
    held = tmp_path / "held.txt"
    held.write_text("pack my box with five dozen liquor jugs. " * 4)
    d = T.load_data([data], tok, 32, eos=2, vocab_size=48, eval_paths=[held])
    whole = T.load_data([data], tok, 32, eos=2, vocab_size=48)
    assert len(d.train) == len(whole.train) + len(whole.eval)  # all of --data is trained on
    want = tok.encode(held.read_text())
    assert d.eval.tolist() == [want[i:i + 32] for i in range(0, len(want) - 31, 32)]


def test_inspect_shows_the_training_record(ckpt, data, tmp_path):
    """training.json beside the weights (no torch.load needed): `inspect --json` gives its step, settings and
    losses, equal to the run's own numbers; the human view has a training line."""
    result = run(ckpt, data, tmp_path / "o", steps=4, stop_after=3)
    r = CliRunner().invoke(get_app(), ["inspect", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)["training"]
    assert record["step"] == 3 and record["settings"]["steps"] == 4 and record["settings"]["block"] == 4
    assert record["history"]["eval_loss_before"] == result.eval_loss_before
    assert record["history"]["eval_loss_after"] == result.eval_loss_after
    human = CliRunner().invoke(get_app(), ["inspect", str(tmp_path / "o")]).output
    assert "training: step 3 of 4 · eval loss" in human and "1 process" in human and "t per sequence" in human
    assert record["settings"]["noise_per"] == "sequence"
    assert json.loads(CliRunner().invoke(get_app(), ["inspect", str(ckpt), "--json"]).stdout)["training"] is None


def test_log_appends_every_event_as_a_json_line(ckpt, data, tmp_path):
    log = tmp_path / "logs" / "train.jsonl"
    common = ["train", str(ckpt), "--data", str(data), "-o", str(tmp_path / "o"), "--block", "4", "--seq-len", "32",
              "--batch", "2", "--steps", "4", "--warmup", "1", "--eval-every", "2", "--save-every", "0",
              "--device", "cpu", "--log", str(log)]
    for extra in (["--stop-after", "2"], ["--resume"]):
        r = CliRunner().invoke(get_app(), [*common, *extra])
        assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [(e["event"], e.get("step", e.get("start_step"))) for e in events]
    assert kinds == [("started", 0), ("eval", 0), ("step", 1), ("step", 2), ("eval", 2), ("saved", 2),
                     ("started", 2), ("step", 3), ("step", 4), ("eval", 4), ("saved", 4)]
    steps = [e for e in events if e["event"] == "step"]
    assert all(set(e) >= {"loss", "lr", "tokens", "seconds", "time"} for e in steps)
    assert [e["tokens"] for e in steps] == [64, 128, 64, 128]  # tokens of each invocation, 2 × 32 a step

def test_batch_size_is_another_name_for_batch(ckpt, data, tmp_path):
    """`--batch-size`, as generate and bench call it (and mlx-lm's trainer), sets the micro-batch too."""
    log = tmp_path / "train.jsonl"
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(data), "-o", str(tmp_path / "o"), "--block",
                                       "4", "--seq-len", "32", "--batch-size", "3", "--steps", "1", "--warmup", "0",
                                       "--eval-every", "0", "--device", "cpu", "--log", str(log)])
    assert r.exit_code == 0, r.output
    steps = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "step"]
    assert [e["tokens"] for e in steps] == [3 * 32]  # not the default 8 sequences
    assert "96 tok/step · 1 process on cpu" in " ".join(r.stderr.split()), r.stderr  # not "1 process(es)"


def test_the_checkpoint_may_be_named_with_m_as_elsewhere(ckpt, data, tmp_path):
    """`train -m CKPT --data FILE -o OUT` (as generate, bench and eval name a model) is `train CKPT ...`."""
    common = ["--data", str(data), "--block", "4", "--seq-len", "32", "--batch", "2", "--steps", "1",
              "--warmup", "0", "--eval-every", "0", "--device", "cpu"]
    first = CliRunner().invoke(get_app(), ["train", str(ckpt), *common, "-o", str(tmp_path / "a")])
    named = CliRunner().invoke(get_app(), ["train", "-m", str(ckpt), *common, "-o", str(tmp_path / "b")])
    assert first.exit_code == 0 and named.exit_code == 0, named.output
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in tensors(ckpt).items())  # it trained


@pytest.mark.parametrize("case, needle", [
    ("2-d", "not a 1-D array of token ids"), ("float", "not a 1-D array of token ids"),
    ("too big", "outside the model's vocabulary"), ("mixed", "mixes pre-tokenized .npy files with text"),
])
def test_bad_token_files_give_one_error_line(ckpt, data, tmp_path, case, needle):
    arrays = {"2-d": np.zeros((4, 4), np.int32), "float": np.zeros(64, np.float32),
              "too big": np.full(64, 10_000, np.int32), "mixed": np.zeros(64, np.int32)}
    np.save(tmp_path / "t.npy", arrays[case])
    files = ["--data", str(tmp_path / "t.npy")] + (["--data", str(data)] if case == "mixed" else [])
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), *files, "-o", str(tmp_path / "o"), "--block", "4",
                                       "--seq-len", "32", "--steps", "1", "--device", "cpu"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and needle in lines[0], r.output
    assert not (tmp_path / "o").exists()


def test_tokenize_refuses_bad_output_and_keeps_an_existing_one(ckpt, data, tmp_path):
    (tmp_path / "c.npy").write_bytes(b"keep")
    for args, needle in ((["-o", str(tmp_path / "c.npy")], "already exists"), (["-o", str(tmp_path / "c.bin")], ".npy"),
                         (["-o", str(tmp_path / "d.npy"), "--data", str(tmp_path / "c.npy")], "already tokenized")):
        r = CliRunner().invoke(get_app(), ["tokenize", str(ckpt), "--data", str(data), *args])
        assert r.exit_code == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert (tmp_path / "c.npy").read_bytes() == b"keep" and not (tmp_path / "d.npy").exists()


# ---------------------------------------------------------------------------------------------- training

def context_bytes(folder: Path) -> dict[str, tuple]:
    """The raw safetensors bytes of every frozen tensor (dtype and shape included)."""
    ckpt = open_checkpoint(folder)
    out = {}
    for name, info in ckpt.tensors.items():
        if name.startswith(T.FROZEN):
            begin, end = info.file_range
            with open(folder / info.file, "rb") as f:
                f.seek(begin)
                out[name] = (info.dtype, info.shape, f.read(end - begin))
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_cli_20_steps_lower_eval_loss_and_keep_the_context_tower(ckpt, data, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(get_app(), [
        "train", str(ckpt), "--data", str(data), "-o", str(out), "--block", "4", "--seq-len", "32",
        "--batch", "4", "--lr", "3e-3", "--steps", "20", "--warmup", "2", "--eval-every", "10",
        "--save-every", "10", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("steps", "tokens", "first_loss", "final_loss", "eval_loss_before", "eval_loss_after", "seconds"):
        assert key in res
    assert res["steps"] == 20 and res["tokens"] == 20 * 4 * 32
    assert res["eval_loss_after"] < res["eval_loss_before"] - 0.3, res
    assert context_bytes(out) == context_bytes(ckpt)
    before, after = tensors(ckpt), tensors(out)
    assert before.keys() == after.keys() and all(before[k].dtype == after[k].dtype for k in before)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert torch.equal(before["denoiser_tower.layers.2.mixer.gate.e_score_correction_bias"],
                       after["denoiser_tower.layers.2.mixer.gate.e_score_correction_bias"])  # a buffer
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["twotower"]["block_size"] == 4
    state = torch.load(out / T.TRAINER_STATE, weights_only=True)
    assert state["step"] == 20 and "master" not in state  # fp32 checkpoint: the weights are the masters
    assert load_model(out, need_denoiser=True).twotower is not None


def test_json_of_a_diverged_run_is_json(ckpt, data, tmp_path):
    """A run whose loss went NaN prints null for it, as training.json does (json.dumps wrote NaN, which
    strict parsers such as jq refuse), and says so in one Warning line (the summary showed '-', as for a
    loss never measured)."""
    r = CliRunner().invoke(get_app(), [
        "train", str(ckpt), "--data", str(data), "-o", str(tmp_path / "out"), "--block", "4", "--seq-len", "32",
        "--batch", "4", "--lr", "1e6", "--steps", "3", "--warmup", "0", "--eval-every", "0", "--device", "cpu",
        "--json", "--log", str(tmp_path / "log.jsonl")])
    assert r.exit_code == 0, r.output

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    res = json.loads(r.stdout.strip().splitlines()[-1], parse_constant=refuse)
    logged = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in logged if e["event"] == "step"][1:] == [None, None]  # the --log file too
    assert res["final_loss"] is None and res["eval_loss_after"] is None, res  # diverged
    assert res["skipped_steps"] == 2  # steps 2 and 3: the huge weights of step 1 overflow the forward
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]  # said once, not only in a bar
    assert len(warnings) == 1 and warnings[0].startswith("Warning: step 2: the loss is nan: the step is skipped")
    assert "2 steps skipped" in " ".join(r.stderr.split())
    assert f"loss {res['first_loss']:.4f} → - · eval {res['eval_loss_before']:.4f} → - ·" in " ".join(r.stderr.split())
    assert isinstance(res["first_loss"], float) and isinstance(res["eval_loss_before"], float)


def poison(monkeypatch, steps: set[int]) -> None:
    """The training loss of the given (1-based) steps is NaN; evaluations are left alone."""
    forward, calls = T.BlockDenoiser.forward, [0]

    def patched(self, *a, **k):
        loss = forward(self, *a, **k)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] in steps:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(T.BlockDenoiser, "forward", patched)


def test_a_step_with_a_nan_loss_is_skipped_not_applied(ckpt, data, tmp_path, monkeypatch):
    """A NaN loss at the last of 6 steps leaves the weights (and the trainer state) of step 5 exactly, where
    applying it would make every trained weight NaN; the run goes on, says it once and counts it."""
    clean = run(ckpt, data, tmp_path / "clean", steps=6, stop_after=5)
    events = []
    poison(monkeypatch, {6})
    cfg = T.TrainConfig(checkpoint=ckpt, data=[data], out=tmp_path / "nan", block=4, seq_len=32, batch=4, lr=3e-3,
                        steps=6, warmup=2, eval_every=0, save_every=0, device="cpu")
    res = T.train(cfg, on_event=events.append)
    assert math.isnan(res.losses[-1]) and res.losses[:5] == clean.losses and res.skipped_steps == 1
    a, b = tensors(tmp_path / "clean"), tensors(tmp_path / "nan")
    assert all(torch.equal(a[k], b[k]) for k in a)
    warned = [e for e in events if isinstance(e, T.Warned)]
    assert len(warned) == 1 and warned[0].message.startswith("step 6: the loss is nan: the step is skipped")


def test_training_stops_after_ten_non_finite_steps_in_a_row(ckpt, data, tmp_path, monkeypatch):
    """Nine NaN steps in a row, a good one, then ten: the run stops at the tenth of those with one Error line
    naming the steps and the step OUT holds (the last save, before them); the skipped steps were counted."""
    poison(monkeypatch, set(range(2, 11)) | set(range(12, 30)))
    r = CliRunner().invoke(get_app(), [
        "train", str(ckpt), "--data", str(data), "-o", str(tmp_path / "out"), "--block", "4", "--seq-len", "32",
        "--batch", "4", "--steps", "40", "--warmup", "0", "--eval-every", "0", "--save-every", "11",
        "--device", "cpu"])
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert errors == [f"Error: training diverged: the loss or gradients were not finite for 10 steps in a row "
                      f"(steps 12–21, all skipped); {tmp_path / 'out'} holds step 11 (hint: lower --lr or raise "
                      "--warmup, then continue with --resume)"], r.stderr
    state = torch.load(tmp_path / "out" / T.TRAINER_STATE, weights_only=True)
    assert state["step"] == 11 and state["history"]["skipped_steps"] == 9
    shown = CliRunner().invoke(get_app(), ["inspect", str(tmp_path / "out")])
    assert "· 9 steps skipped (not finite)" in " ".join(shown.stderr.split()), shown.stderr
    assert all(torch.isfinite(t).all() for t in tensors(tmp_path / "out").values())


def test_divergence_in_a_job_is_said_by_rank_0_alone():
    """Every rank sees the same all-reduced losses and stops alike: rank 0 says it as it is (no "rank 0 of 2:"
    prefix), the others exit quietly, as for a check every rank makes; another error after the start stays
    the rank's own."""
    env = T.Dist(0, 2, torch.device("cpu"), False, training=True, saved=4)
    e = T.Diverged("training diverged: ...", "lower --lr")
    assert T._job_error(e, 0, 2, env, Path("out")) is e
    assert isinstance(T._job_error(e, 1, 2, env, Path("out")), T.OtherRankReports)
    other = T._job_error(TwoTowerError("disk full"), 1, 2, env, Path("out"))
    assert isinstance(other, TwoTowerError) and other.message.startswith("rank 1 of 2: ")


@pytest.mark.parametrize("at, saved", [(7, 6), (1, None)])
def test_ctrl_c_says_which_step_out_holds(ckpt, data, tmp_path, monkeypatch, at, saved):
    """Ctrl-C (KeyboardInterrupt) at step `at`, saving every 3 steps: one Error line that names the step OUT
    holds (its trainer state's) and how to go on, or that nothing was written ("interrupted" said neither)."""
    real = T.learning_rate

    def interrupted(step, *args):
        if step == at:
            raise KeyboardInterrupt
        return real(step, *args)

    monkeypatch.setattr(T, "learning_rate", interrupted)
    out = tmp_path / "out"
    args = ["train", str(ckpt), "--data", str(data), "-o", str(out), "--block", "4", "--seq-len", "32", "--batch",
            "2", "--steps", "10", "--save-every", "3", "--eval-every", "0", "--device", "cpu"]
    r = CliRunner().invoke(get_app(), args)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    if saved is None:
        assert not out.exists() and "interrupted before the first save" in lines[0], r.output
        return
    assert torch.load(out / T.TRAINER_STATE, weights_only=True)["step"] == saved
    assert f"holds step {saved}" in lines[0] and "--resume" in lines[0], r.output
    monkeypatch.undo()
    assert CliRunner().invoke(get_app(), [*args, "--resume"]).exit_code == 0


def test_an_interrupt_while_a_save_removes_the_previous_one_is_not_a_failed_save(ckpt, data, tmp_path, monkeypatch):
    """Ctrl-C while a save removes the save before it, after the new one took OUT's name: that save is done
    (`train -o` said OUT held the step before), and the interrupt still stops the run (it is not lost in the
    save): one Error line naming the new step; `--resume` goes on from it and removes what was left of the
    old one."""
    from twotower_cli import checkpoint

    real, calls = checkpoint._remove, []

    def remove(path):
        calls.append(path)
        if len(calls) == 1:  # the save at step 4 removing step 2's (the save at 2 had none to remove)
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(checkpoint, "_remove", remove)
    out = tmp_path / "out"
    args = ["train", str(ckpt), "--data", str(data), "-o", str(out), "--block", "4", "--seq-len", "32", "--batch",
            "4", "--steps", "6", "--warmup", "2", "--save-every", "2", "--eval-every", "0", "--device", "cpu"]
    r = CliRunner().invoke(get_app(), args)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(lines) == 1 and "holds step 4" in lines[0], r.output
    assert len(calls) == 1 and torch.load(out / T.TRAINER_STATE, weights_only=True)["step"] == 4
    assert len(list(tmp_path.iterdir())) == 2  # OUT and the old save's remains, for the next run
    monkeypatch.undo()
    again = CliRunner().invoke(get_app(), [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert torch.load(out / T.TRAINER_STATE, weights_only=True)["step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_time_conditioning_only(ckpt, data, tmp_path):
    out = tmp_path / "tc"
    run(ckpt, data, out, steps=3, train="time-conditioning")
    before, after = tensors(ckpt), tensors(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(T.TIME_CONDITIONING) for k in changed), sorted(changed)


def test_resume_is_exact(ckpt, data, tmp_path):
    full = run(ckpt, data, tmp_path / "full", steps=10)
    first = run(ckpt, data, tmp_path / "split", steps=10, stop_after=5)
    second = run(ckpt, data, tmp_path / "split", steps=10, resume=True)
    assert second.start_step == 5 and second.steps == 10
    assert first.losses + second.losses == full.losses
    assert second.first_loss == full.first_loss and second.eval_loss_before == full.eval_loss_before
    a, b = tensors(tmp_path / "full"), tensors(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_warmup_keeps_the_runs_warmup(ckpt, data, tmp_path):
    """`--resume` without `--warmup` continues with the warmup the run started with; it took the default
    again (min(100, steps // 10) of this call's --steps: 1 here, not 3), so the learning rates and the
    weights parted from the uninterrupted run's."""
    def go(out, **kw):
        cfg = T.TrainConfig(checkpoint=ckpt, data=[data], out=out, block=4, seq_len=32, batch=4, lr=3e-3,
                            steps=10, eval_every=0, save_every=0, device="cpu", **kw)
        return T.train(cfg)

    go(tmp_path / "full", warmup=3)
    go(tmp_path / "split", warmup=3, stop_after=4)
    go(tmp_path / "split", resume=True)
    a, b = tensors(tmp_path / "full"), tensors(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "split" / T.TRAINER_STATE, weights_only=True)["settings"]
    assert saved["warmup"] == 3


def test_resume_after_a_crash_between_the_renames_of_a_save(ckpt, data, tmp_path):
    """Where OUT cannot be swapped in one step, a run killed between moving OUT aside and moving the new save
    in leaves only `.OUT.old-MACHINE-PID`: `--resume` puts it back and continues from it, instead of finding
    no OUT and starting over."""
    import subprocess
    import sys

    from twotower_cli.checkpoint import _machine

    run(ckpt, data, tmp_path / "out", steps=4, stop_after=2)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (tmp_path / "out").rename(tmp_path / f".out.old-{_machine()}-{dead.pid}")
    second = run(ckpt, data, tmp_path / "out", steps=4, resume=True)
    assert second.start_step == 2 and second.steps == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_resume_refuses_a_trainer_state_of_another_version(ckpt, data, tmp_path):
    """Version 1 states (per-expert parameters, so per-expert optimizer states) cannot resume version 2's
    stacked experts: one error with the way out, not a mismatched optimizer."""
    run(ckpt, data, tmp_path / "out", steps=4, stop_after=2)
    path = tmp_path / "out" / T.TRAINER_STATE
    state = torch.load(path, weights_only=True)
    assert state["version"] == T.STATE_VERSION == 2
    torch.save({**state, "version": 1}, path)
    with pytest.raises(TwoTowerError, match="not a trainer state this version understands"):
        run(ckpt, data, tmp_path / "out", steps=4, resume=True)


@pytest.mark.parametrize("content", [b"garbage\n", b"PK\x03\x04" + b"\0" * 40])
def test_a_corrupt_trainer_state_is_one_line_without_torchs_unsafe_advice(ckpt, data, tmp_path, content):
    """torch's error for a file it cannot load is paragraphs ending in advice to retry with weights_only=False
    ("can result in arbitrary code execution"): the Error was six lines, with that advice. It is one line."""
    run(ckpt, data, tmp_path / "out", steps=4, stop_after=2)
    (tmp_path / "out" / T.TRAINER_STATE).write_bytes(content)
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(data), "-o", str(tmp_path / "out"),
                                       "--block", "4", "--seq-len", "32", "--steps", "4", "--resume"])
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: cannot read {tmp_path / 'out' / T.TRAINER_STATE}: not a trainer state torch "
                               "can load ("), lines
    assert lines[0].endswith("(hint: the file may be truncated or corrupt; pass --force to start over)")
    assert "weights_only" not in lines[0]


def test_an_error_message_of_several_lines_is_reported_on_one(monkeypatch):
    """Whatever a message holds (an exception's text of paragraphs), the Error is one line."""
    from twotower_cli.cli import report_error

    lines = []
    monkeypatch.setattr("twotower_cli.display.err_console", lambda: type("C", (), {
        "print": staticmethod(lambda text, **kw: lines.append(text))})())
    report_error(TwoTowerError("first\nsecond\n\nthird", "a\nb"))
    assert len(lines) == 1 and "\n" not in lines[0] and "first second  third" in lines[0] and "a b" in lines[0]


def test_resume_keeps_the_runs_noise_level_draw(ckpt, data, tmp_path):
    """--noise-per is part of the run: resuming with the other one is refused, and a state saved before the
    option existed (no `noise_per` in its settings) is a per-block run, as those runs were."""
    run(ckpt, data, tmp_path / "out", steps=4, stop_after=2, noise_per="block")
    with pytest.raises(TwoTowerError, match="noise_per is sequence but the saved run used block"):
        run(ckpt, data, tmp_path / "out", steps=4, resume=True)
    path = tmp_path / "out" / T.TRAINER_STATE
    state = torch.load(path, weights_only=True)
    del state["settings"]["noise_per"]
    torch.save(state, path)
    assert run(ckpt, data, tmp_path / "out", steps=4, resume=True, noise_per="block").start_step == 2
    with pytest.raises(TwoTowerError, match="--noise-per 'example' is not one of sequence, block"):
        run(ckpt, data, tmp_path / "other", steps=4, noise_per="example")


def test_bf16_checkpoint_keeps_dtypes_and_bytes(tmp_path, data):
    base = random_base(tiny_cfg(), seed=5)
    src = write_twotower(tmp_path / "fp32", base)
    bf = tmp_path / "bf16"
    bf.mkdir()
    from twotower_cli.checkpoint import write_checkpoint

    t32 = tensors(src)
    write_checkpoint(bf, {k: v if k.endswith(("A_log", "mixer.D", "dt_bias")) else v.bfloat16() for k, v in t32.items()},
                     json.loads((src / "config.json").read_text()), force=True,
                     extra_files=[src / "tokenizer.json", src / "tokenizer_config.json"])
    run(bf, data, tmp_path / "out", steps=2, dtype="bf16")
    before, after = tensors(bf), tensors(tmp_path / "out")
    assert all(before[k].dtype == after[k].dtype for k in before)
    assert context_bytes(tmp_path / "out") == context_bytes(bf)
    state = torch.load(tmp_path / "out" / T.TRAINER_STATE, weights_only=True)
    assert state["master"]["lm_head.weight"].dtype == torch.float32


def test_a_save_that_fp16_cannot_hold_is_refused_and_out_is_left_alone(tmp_path, data):
    """An fp16 checkpoint trained at an absurd --lr: the fp32 masters stay finite (the steps that overflow
    are skipped) but leave fp16's range, so the save would hold Inf. It is refused with one Error line naming
    the step and the tensor, and nothing is written; at a sane --lr the same checkpoint saves in fp16."""
    from twotower_cli.checkpoint import write_checkpoint

    src = write_twotower(tmp_path / "fp32", random_base(tiny_cfg(), seed=5))
    half = tmp_path / "fp16"
    half.mkdir()
    write_checkpoint(half, {k: v if k.endswith(("A_log", "mixer.D", "dt_bias")) else v.half()
                            for k, v in tensors(src).items()},
                     json.loads((src / "config.json").read_text()), force=True,
                     extra_files=[src / "tokenizer.json", src / "tokenizer_config.json"])
    common = ["train", str(half), "--data", str(data), "--block", "4", "--seq-len", "32", "--batch", "4",
              "--steps", "3", "--warmup", "0", "--eval-every", "0", "--device", "cpu"]
    r = CliRunner().invoke(get_app(), [*common, "-o", str(tmp_path / "out"), "--lr", "1e6"])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert errors[0].startswith("Error: step 3: the trained denoiser_tower.") and "beyond fp16's range" in errors[0]
    assert f"nothing was saved to {tmp_path / 'out'}" in errors[0] and "--lr" in errors[0]
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(get_app(), [*common, "-o", str(tmp_path / "sane"), "--lr", "3e-3"])
    assert r.exit_code == 0, r.output
    saved = tensors(tmp_path / "sane")
    assert saved["lm_head.weight"].dtype == torch.float16 and all(bool(t.isfinite().all()) for t in saved.values())


# ---------------------------------------------------------------------------------------------- errors

def bad_inputs(ckpt: Path, data: Path, tmp: Path) -> dict[str, list[str]]:
    (tmp / "empty.txt").write_text("")
    base = write_base(tmp / "base", random_base(tiny_cfg(), seed=0))
    (tmp / "exists").mkdir(exist_ok=True)
    common = ["--block", "4", "--seq-len", "32", "--steps", "1", "--device", "cpu"]
    return {
        "missing data": ["train", str(ckpt), "--data", str(tmp / "nope.txt"), "-o", str(tmp / "o1"), *common],
        "empty data": ["train", str(ckpt), "--data", str(tmp / "empty.txt"), "-o", str(tmp / "o2"), *common],
        "not a TwoTower": ["train", str(base), "--data", str(data), "-o", str(tmp / "o3"), *common],
        "seq-len vs block": ["train", str(ckpt), "--data", str(data), "-o", str(tmp / "o4"), "--block", "5",
                             "--seq-len", "32"],
        "existing out": ["train", str(ckpt), "--data", str(data), "-o", str(tmp / "exists"), *common],
        "bf16 without fsdp": ["train", str(ckpt), "--data", str(data), "-o", str(tmp / "o5"), *common,
                              "--compute-dtype", "bf16"],
        "compute dtype": ["train", str(ckpt), "--data", str(data), "-o", str(tmp / "o6"), *common,
                          "--compute-dtype", "fp8"],
    }


@pytest.mark.parametrize("case", ["missing data", "empty data", "not a TwoTower", "seq-len vs block", "existing out",
                                  "bf16 without fsdp", "compute dtype"])
def test_bad_inputs_give_one_error_line(ckpt, data, tmp_path, case):
    r = CliRunner().invoke(get_app(), bad_inputs(ckpt, data, tmp_path)[case])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1, r.output
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args, needle", [
    (["--lr", "nan"], "Error: --lr must be positive, not nan"),
    (["--lr", "inf"], "Error: --lr must be finite, not inf"),
    (["--data-folder"], "is a folder, not a file"),
    (["--seed", "-1"], "Error: --seed -1 is out of range"),  # was numpy's ValueError, "this looks like a bug"
    (["--seed", str(2**64)], f"Error: --seed {2**64} is out of range (hint: use a seed from 0 to 2**64 - 1)"),
])
def test_options_and_data_a_user_gets_wrong_are_named_in_the_error(ckpt, data, tmp_path, args, needle):
    """--lr nan used to be AdamW's ValueError "looks like a bug", --lr inf trained to NaN weights, and a
    folder given as --data "does not exist"."""
    if args == ["--data-folder"]:
        args = ["--data", str(data.parent)]
    out = tmp_path / "o"
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(data), "-o", str(out), "--block", "4",
                                       "--seq-len", "32", "--steps", "1", "--device", "cpu", *args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and needle in lines[0], r.output
    assert not out.exists()


def test_data_from_a_pipe_trains_as_from_a_file(ckpt, data, tmp_path):
    """`--data <(zcat corpus.txt.gz)`: train read it as tokenize and eval do (it said "does not exist")."""
    args = ["--block", "4", "--seq-len", "32", "--steps", "2", "--eval-every", "0", "--device", "cpu", "--json"]
    piped = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(fed_through_a_pipe(tmp_path / "p", TEXT)),
                                           "-o", str(tmp_path / "piped"), *args])
    assert piped.exit_code == 0, piped.output
    plain = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(data), "-o", str(tmp_path / "plain"),
                                           *args])
    keys = ("first_loss", "final_loss", "eval_loss_after")
    assert [json.loads(piped.stdout)[k] for k in keys] == [json.loads(plain.stdout)[k] for k in keys]


def test_each_rank_of_a_job_cannot_share_a_pipe(ckpt, tmp_path, monkeypatch):
    """Under torchrun every rank reads the data: a pipe would give each a part of it (or nothing)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    os.mkfifo(tmp_path / "p")
    with pytest.raises(TwoTowerError, match="is a pipe, not a file") as e:
        run(ckpt, tmp_path / "p", tmp_path / "o")
    assert "each rank reads the data" in e.value.hint and not (tmp_path / "o").exists()


def test_a_checkpoint_given_as_data_is_named_as_one(ckpt, data, tmp_path):
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(data), "--eval-data", str(ckpt),
                                       "-o", str(tmp_path / "o"), "--steps", "1"])
    assert r.exit_code == 1 and r.stderr.splitlines() == [
        f"Error: {ckpt} is a checkpoint folder, not a data file (hint: check the --data and --eval-data paths "
        "(each names a file))"], r.output


# ---------------------------------------------------------------------------------------------- DDP

def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun` (as `python -m torch.distributed.run`, which needs no script on the PATH) on this Python."""
    # TMPDIR: torchrun's agent leaves a torchelastic_* folder in the temporary folder at every run
    with tempfile.TemporaryDirectory(prefix="twotower-torchrun-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp}
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              str(nproc), *args], capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


TRAIN_ARGS = ["--block", "4", "--seq-len", "32", "--batch", "2", "--lr", "3e-3", "--warmup", "1", "--eval-every", "0",
              "--device", "cpu", "--json"]

JOB_FLAGS = {"ddp": [], "fsdp": ["--fsdp"], "fsdp+recompute": ["--fsdp", "--gradient-checkpointing"],
             "fsdp+time-conditioning": ["--fsdp", "--train", "time-conditioning"],
             "one": ["--grad-accum", "2"], "one+time-conditioning": ["--grad-accum", "2", "--train", "time-conditioning"]}


@pytest.fixture(scope="module")
def jobs(ckpt, data, tmp_path_factory):
    """`jobs(name)`: the 3-step training run JOB_FLAGS[name] names (2 processes under torchrun; "one…": this
    process, with --grad-accum 2), run once for the tests that read it: (its JSON line, its OUT, its stderr).
    Each torchrun job costs ~9 s of start-up on 2 cores. A test that writes into an OUT copies it first."""
    root, done = tmp_path_factory.mktemp("jobs"), {}

    def job(name: str) -> tuple[dict, Path, str]:
        if name not in done:
            out = root / name
            args = ["train", str(ckpt), "--data", str(data), *TRAIN_ARGS, "--steps", "3", *JOB_FLAGS[name],
                    "-o", str(out)]
            if name.startswith("one"):
                r = CliRunner().invoke(get_app(), args)
                assert r.exit_code == 0, r.output
                stdout, stderr = r.stdout.strip().splitlines()[-1], r.stderr  # one JSON line
            else:
                run = torchrun("-m", "twotower_cli", *args)
                stdout, stderr = run.stdout, run.stderr
            done[name] = (json.loads(stdout), out, stderr)
        return done[name]

    return job


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp", "fsdp+recompute", "fsdp+time-conditioning"])
def test_two_processes_equal_one_with_grad_accum(jobs, ckpt, how):
    """(fsdp+recompute: with --gradient-checkpointing, against the one process without it;
    fsdp+time-conditioning: both train the time conditioning only, the rest frozen in FSDP's units too.)"""
    (r2, two, _), (r1, one, _) = jobs(how), jobs("one+time-conditioning" if "time" in how else "one")
    assert r2["tokens"] == r1["tokens"] == 3 * 4 * 32
    for key in ("first_loss", "final_loss", "eval_loss_before", "eval_loss_after"):
        assert abs(r2[key] - r1[key]) < 1e-5, key
    a, b = tensors(two), tensors(one)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-5
    assert context_bytes(two) == context_bytes(ckpt)
    assert (two / "trainer_shards").is_dir() == how.startswith("fsdp")


@pytest.mark.slow
def test_fsdp_shards_each_tower_and_resumes_exactly(jobs, ckpt, data, tmp_path):
    """Each of 2 ranks holds about half of the trained part and of the context tower; a run stopped at step 1
    and resumed gives the losses and weights of an uninterrupted one, exactly."""
    ranks = [json.loads(line) for line in torchrun(str(Path(__file__).with_name("fsdp_shards.py")),
                                                     str(ckpt)).stdout.splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for part in ("trained", "context"):
        total = ranks[0][part]["total"]
        assert all(r[part]["sharded"] and r[part]["total"] == total for r in ranks)
        assert sum(r[part]["local"] for r in ranks) == total
        assert max(r[part]["local"] for r in ranks) < 0.6 * total
    full, full_out, full_stderr = jobs("fsdp")
    # stderr holds the run's own lines only: not FSDP2's "returned a view tensor" UserWarning (once per rank and
    # module kind, at the first forward: the filter that meant to hide it held only while loading)
    assert "Warning" not in full_stderr, full_stderr
    args = ["-m", "twotower_cli", "train", str(ckpt), "--data", str(data), *TRAIN_ARGS, "--steps", "3",
            *JOB_FLAGS["fsdp"], "-o", str(tmp_path / "split")]
    first = json.loads(torchrun(*args, "--stop-after", "1").stdout)
    second = json.loads(torchrun(*args, "--resume").stdout)
    assert (first["steps"], second["start_step"], second["steps"]) == (1, 1, 3)
    assert second["final_loss"] == full["final_loss"] and second["eval_loss_after"] == full["eval_loss_after"]
    a, b = tensors(full_out), tensors(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp_bf16_compute_is_close_to_fp32_and_not_equal(jobs, ckpt, data, tmp_path):
    """--compute-dtype bf16: the trained part computes in bf16 (so the losses move, a little) and its fp32
    masters are written in the source dtypes as always. (A little: up to 1.5 % here, as the time embedding
    then takes 1000·t rounded to bf16, as NVIDIA's trainer does; this tiny model's random time conditioning
    reads its fastest frequencies, which that rounding moves most.)"""
    fp32, fp32_out, _ = jobs("fsdp")
    bf16 = json.loads(torchrun("-m", "twotower_cli", "train", str(ckpt), "--data", str(data), *TRAIN_ARGS, "--steps",
                               "3", *JOB_FLAGS["fsdp"], "--compute-dtype", "bf16", "-o", str(tmp_path / "bf16")).stdout)
    for key in ("first_loss", "final_loss", "eval_loss_after"):
        assert bf16[key] != fp32[key] and abs(bf16[key] - fp32[key]) < 3e-2 * fp32[key], key
    a, b = tensors(fp32_out), tensors(tmp_path / "bf16")
    assert all(a[k].dtype == b[k].dtype for k in a) and context_bytes(tmp_path / "bf16") == context_bytes(ckpt)


def torchrun_failing(*args: str, nproc: int = 2, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """(exit code, the `Error:` lines) of a torchrun job expected to fail (as `torchrun`)."""
    with tempfile.TemporaryDirectory(prefix="twotower-torchrun-") as tmp:
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              str(nproc), *args], capture_output=True, text=True, timeout=180,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp, **(env or {})})
    return run.returncode, [ln for ln in run.stderr.splitlines() if ln.startswith("Error:")]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_a_check_every_rank_fails_is_one_error_line_for_the_job(jobs, ckpt, data, tmp_path, fsdp):
    """A resume with another world size is refused by every rank alike: the job says it once (it said it
    once per rank), and OUT keeps its save."""
    name = "fsdp" if fsdp else "ddp"
    out = tmp_path / "o"
    shutil.copytree(jobs(name)[1], out)
    before = tree(out)
    code, errors = torchrun_failing("-m", "twotower_cli", "train", str(ckpt), "--data", str(data), *TRAIN_ARGS,
                                    "--steps", "4", *JOB_FLAGS[name], "-o", str(out), "--resume", nproc=3)
    assert code != 0 and errors == ["Error: cannot resume: world_size is 3 but the saved run used 2 (hint: resume "
                                    "with the same settings, or --force)"], errors
    assert tree(out) == before


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_one_rank_failing_is_said_by_that_rank_and_rank_0_says_what_out_holds(ckpt, data, tmp_path, fail_rank):
    """One rank of two fails at step 3 (after the save of step 2): that rank's Error line names it and the
    cause; rank 0, if another rank failed, says the job stopped and which step OUT holds; the other ranks
    say nothing: no line carries the transport's "connection closed" (which every other rank printed, as a
    bug). (Two ranks, not three: each process is ~3 s of start-up on 2 cores, and fail_rank 0 leaves a
    rank other than 0 that must stay silent.)"""
    out = tmp_path / "o"
    code, errors = torchrun_failing(str(Path(__file__).with_name("failing_rank.py")), "train", str(ckpt), "--data",
                                    str(data), *TRAIN_ARGS, "--steps", "8", "--save-every", "2", "-o", str(out),
                                    nproc=2, env={"FAIL_RANK": str(fail_rank), "FAIL_CALL": "4"})
    assert code != 0
    cause = f"Error: rank {fail_rank} of 2: RuntimeError: out of memory on this rank (simulated)"
    stopped = (f"Error: stopped: another process of the job ended (interrupted, or failed: then its Error line says "
               f"why); {out} holds step 2 (hint: continue with the same command and --resume)")
    assert sorted(ln.split(" (hint")[0] if ln.startswith(cause) else ln for ln in errors) == sorted(
        [cause, *([stopped] if fail_rank else [])]), errors
    assert torch.load(out / "trainer_state.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_a_check_of_one_ranks_own_gpu_is_said_by_that_rank(ckpt, data, tmp_path):
    """A TwoTowerError that only one rank meets while loading (its GPU's memory check) is said by that rank,
    with its rank: it was taken for a check every rank makes alike, left to rank 0, and no line said why."""
    code, errors = torchrun_failing(str(Path(__file__).with_name("failing_rank.py")), "train", str(ckpt), "--data",
                                    str(data), *TRAIN_ARGS, "--steps", "4", "-o", str(tmp_path / "o"), nproc=2,
                                    env={"FAIL_RANK": "1", "FAIL_AT": "load"})
    assert code != 0
    assert "Error: rank 1 of 2: not enough free memory on this rank's GPU (simulated) (hint: free some)" in errors, errors
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_sigterm_to_torchrun_is_one_error_line_saying_the_step_out_holds(ckpt, data, tmp_path):
    """SIGTERM to torchrun (a scheduler stopping the job) reaches every rank: one Error line for the job,
    with the step OUT holds (rank 1 said, besides, that OUT was never written), and OUT resumes."""
    import signal

    out = tmp_path / "o"
    with tempfile.TemporaryDirectory(prefix="twotower-torchrun-") as tmp:
        job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                "2", "-m", "twotower_cli", "train", str(ckpt), "--data", str(data), *TRAIN_ARGS,
                                "--steps", "100000", "--save-every", "1", "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp})
        try:
            seen = []
            for line in job.stderr:  # stopped once a save is said
                seen.append(line)
                if ": saved " in line:
                    break
            job.send_signal(signal.SIGTERM)
            _, rest = job.communicate(timeout=120)
        finally:
            job.kill()
    errors = [ln for ln in [*seen, *rest.splitlines()] if ln.startswith("Error:")]
    assert job.returncode != 0 and len(errors) == 1, errors
    step = torch.load(out / "trainer_state.pt", weights_only=True)["step"]
    assert f"{out} holds step {step} (hint: continue with the same command and --resume)" in errors[0], errors


def test_fsdp_outside_torchrun_is_one_error_line(ckpt, data, tmp_path):
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(data), *TRAIN_ARGS, "--steps", "1", "--fsdp",
                                       "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.stderr.startswith("Error: --fsdp shards the model over the processes torchrun"), r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
def test_fsdp_on_one_gpu_equals_the_unsharded_run(ckpt, data, tmp_path):
    """NCCL and CUDA: one FSDP rank (torchrun) against the plain process, same device, same steps; and with
    the trained part computing in bf16, close to it."""
    args = ["train", str(ckpt), "--data", str(data), *TRAIN_ARGS[:-3], "--device", "cuda", "--json", "--steps", "3"]
    sharded = json.loads(torchrun("-m", "twotower_cli", *args, "--fsdp", "-o", str(tmp_path / "fsdp"), nproc=1).stdout)
    plain = CliRunner().invoke(get_app(), [*args, "-o", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    plain = json.loads(plain.stdout.strip().splitlines()[-1])
    for key in ("first_loss", "final_loss", "eval_loss_after"):
        assert abs(sharded[key] - plain[key]) < 1e-3, key
    assert context_bytes(tmp_path / "fsdp") == context_bytes(ckpt)
    bf16 = json.loads(torchrun("-m", "twotower_cli", *args, "--fsdp", "--compute-dtype", "bf16", "-o",
                               str(tmp_path / "bf16"), nproc=1).stdout)
    assert all(abs(bf16[key] - plain[key]) < 2e-2 * plain[key] for key in ("first_loss", "final_loss"))


# ---------------------------------------------------------------------------------------------- guards (user audit)

SMALL = ["--seq-len", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--eval-every", "0", "--device", "cpu"]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative name → bytes): what a refused command must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and "hint" in lines[0], r.output
    assert r.stdout == ""
    return lines[0]


@pytest.fixture
def project(ckpt, data, tmp_path):
    """proj/ holding a checkpoint, the data and a notes file; proj/run: an earlier training output."""
    proj = tmp_path / "proj"
    shutil.copytree(ckpt, proj / "ckpt")
    shutil.copy(data, proj / "small.txt")
    (proj / "notes.txt").write_text("mine")
    r = CliRunner().invoke(get_app(), ["train", str(proj / "ckpt"), "--data", str(proj / "small.txt"),
                                       "-o", str(proj / "run"), "--block", "4", *SMALL])
    assert r.exit_code == 0, r.output
    return proj


@pytest.mark.parametrize("case, needle", [
    ("-o . in the project", "holds the source checkpoint ckpt"),
    ("-o . in the run, --resume", "is the current folder or holds it"),
    ("-o the folder holding the checkpoint", "holds the source checkpoint"),
    ("-o the checkpoint", "is the source folder"),
    ("-o inside the checkpoint", "is inside the source checkpoint"),
    ("--data inside OUT", "holds the --data file"),
    ("--eval-data inside OUT", "holds the --eval-data file"),
    ("--log inside OUT", "holds the --log file"),
    ("--resume, OUT holds the checkpoint", "holds the source checkpoint"),
    ("-o the current folder's parent", "holds the source checkpoint"),
    ("-o the current folder's parent, checkpoint elsewhere", "is the current folder or holds it"),
])
def test_out_that_would_delete_the_source_the_data_or_the_current_folder_is_refused(ckpt, project, monkeypatch,
                                                                                   case, needle):
    """Every save replaces OUT whole, so with --force (or --resume) these deleted the project, the checkpoint
    or the data (`cd proj && train ./ckpt --data small.txt -o . --force` deleted proj/). Now: one Error line,
    exit 1, every file as it was."""
    proj = project
    monkeypatch.chdir(proj)
    (proj / "run" / "held.txt").write_text(TEXT)
    args = {
        "-o . in the project": ["./ckpt", "--data", "small.txt", "-o", ".", "--force"],
        "-o the folder holding the checkpoint": [str(proj / "ckpt"), "--data", str(proj / "small.txt"), "-o",
                                                 str(proj), "--force"],
        "-o the checkpoint": ["ckpt", "--data", "small.txt", "-o", "ckpt", "--force"],
        "-o inside the checkpoint": ["ckpt", "--data", "small.txt", "-o", "ckpt/trained"],
        "--data inside OUT": ["ckpt", "--data", "run/held.txt", "-o", "run", "--force"],
        "--eval-data inside OUT": ["ckpt", "--data", "small.txt", "--eval-data", "run/held.txt", "-o", "run",
                                   "--force"],
        "--log inside OUT": ["ckpt", "--data", "small.txt", "-o", "run", "--force", "--log", "run/log.jsonl"],
        "--resume, OUT holds the checkpoint": ["run/ckpt", "--data", "small.txt", "-o", "run", "--resume"],
        "-o the current folder's parent": ["ckpt", "--data", "small.txt", "-o", str(proj.parent), "--force"],
        "-o the current folder's parent, checkpoint elsewhere": [str(ckpt), "--data", "small.txt", "-o",
                                                                 str(proj.parent), "--force"],
        "-o . in the run, --resume": ["../ckpt", "--data", "../small.txt", "-o", ".", "--resume"],
    }[case]
    if case == "-o . in the run, --resume":
        monkeypatch.chdir(proj / "run")
    if case == "--resume, OUT holds the checkpoint":
        shutil.copytree(proj / "ckpt", proj / "run" / "ckpt")
    before = tree(proj.parent)
    r = CliRunner().invoke(get_app(), ["train", *args, "--block", "4", *SMALL[:4], "--steps", "3", *SMALL[6:]])
    assert needle in one_error(r)
    assert tree(proj.parent) == before


def test_resume_with_out_as_the_checkpoint_still_continues_it(project, monkeypatch):
    """`train OUT -o OUT --resume` (the checkpoint argument is the run itself) continues the run, as before;
    a checkpoint that is no training run (no trainer state) is one Error line saying so."""
    monkeypatch.chdir(project)
    r = CliRunner().invoke(get_app(), ["train", "run", "--data", "small.txt", "-o", "run", "--resume", "--json",
                                       "--block", "4", *SMALL[:4], "--steps", "3", *SMALL[6:]])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["start_step"] == 2 and res["steps"] == 3
    assert torch.load(project / "run" / T.TRAINER_STATE, weights_only=True)["step"] == 3
    before = tree(project)
    r = CliRunner().invoke(get_app(), ["train", "ckpt", "--data", "small.txt", "-o", "ckpt", "--resume",
                                       "--block", "4", *SMALL])
    assert "nothing to resume" in one_error(r) and tree(project) == before


def test_resume_and_force_together_are_refused(project):
    """They conflict (--force: start over replacing OUT; --resume: continue it); it used to resume silently."""
    before = tree(project)
    r = CliRunner().invoke(get_app(), ["train", str(project / "ckpt"), "--data", str(project / "small.txt"), "-o",
                                       str(project / "run"), "--resume", "--force", "--block", "4", *SMALL[:4],
                                       "--steps", "3", *SMALL[6:]])
    line = one_error(r)
    assert "--resume and --force conflict" in line and tree(project) == before


def test_block_defaults_to_the_checkpoints_recorded_block(ckpt, data, tmp_path):
    """Without --block, the checkpoint's twotower.block_size (4 here) is trained and kept, not 16: the run
    equals one with --block 4, and config.json still says 4. A checkpoint that records none gets 16."""
    common = ["--data", str(data), *SMALL, "--json"]
    runs = {}
    for name, extra in (("default", []), ("explicit", ["--block", "4"])):
        r = CliRunner().invoke(get_app(), ["train", str(ckpt), "-o", str(tmp_path / name), *common, *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
        assert json.loads((tmp_path / name / "config.json").read_text())["twotower"]["block_size"] == 4
        assert json.loads((tmp_path / name / T.TRAINING_SUMMARY).read_text())["settings"]["block"] == 4
    assert runs["default"]["final_loss"] == runs["explicit"]["final_loss"]
    assert runs["default"]["eval_loss_after"] == runs["explicit"]["eval_loss_after"]
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    config = json.loads((bare / "config.json").read_text())
    del config["twotower"]["block_size"]
    (bare / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(get_app(), ["train", str(bare), "-o", str(tmp_path / "o16"), *common])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o16" / "config.json").read_text())["twotower"]["block_size"] == 16
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "-o", str(tmp_path / "o30"), *common, "--seq-len", "30"])
    assert "--seq-len 30 is not a multiple of the block size 4 (twotower.block_size in" in one_error(r)
    assert not (tmp_path / "o30").exists()
    help_text = CliRunner().invoke(get_app(), ["train", "--help"], env={"COLUMNS": "300"}).output
    assert "twotower.block_size" in help_text


@pytest.mark.parametrize("warmup, steps, needle", [(5, 2, "never reaches --lr 0.003"),
                                                   (2, 2, "only at the last step"), (1, 2, None)])
def test_warmup_not_below_steps_is_a_warning(ckpt, data, tmp_path, warmup, steps, needle):
    """A --warmup the schedule never finishes: the run goes on, with one Warning line; the learning rates
    it logs confirm that --lr is never reached (or only at the last step)."""
    log = tmp_path / "log.jsonl"
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(data), "-o", str(tmp_path / "o"),
                                       "--block", "4", "--seq-len", "32", "--batch", "2", "--lr", "3e-3",
                                       "--steps", str(steps), "--warmup", str(warmup), "--device", "cpu",
                                       "--log", str(log)])
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    lrs = [e["lr"] for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "step"]
    if needle is None:
        assert warnings == [] and max(lrs) == pytest.approx(3e-3)
        return
    assert len(warnings) == 1 and needle in warnings[0] and "--warmup" in warnings[0], r.stderr
    assert max(lrs) < 3e-3 if warmup > steps else (lrs[-1] == pytest.approx(3e-3) and max(lrs[:-1]) < 3e-3)


def test_json_tokens_seconds_and_throughput_agree_fresh_and_resumed(ckpt, data, tmp_path):
    """tokens_per_second = tokens / train_seconds, both this invocation's (they were the whole run's tokens
    over this part's time on a resume); total_tokens counts the whole run. Checked against the --log step
    events, which count tokens and step time independently of the result."""
    log = tmp_path / "log.jsonl"
    common = ["train", str(ckpt), "--data", str(data), "-o", str(tmp_path / "o"), "--block", "4", "--seq-len",
              "32", "--batch", "2", "--steps", "5", "--warmup", "1", "--eval-every", "0", "--device", "cpu",
              "--json", "--log", str(log)]
    results = []
    for extra in (["--stop-after", "2"], ["--resume"]):
        r = CliRunner().invoke(get_app(), [*common, *extra])
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout.strip().splitlines()[-1])
        last = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "step"][-1]
        assert res["tokens"] == last["tokens"] and res["train_seconds"] == last["seconds"]
        assert res["tokens_per_second"] == pytest.approx(res["tokens"] / res["train_seconds"], rel=1e-12)
        assert 0 < res["train_seconds"] <= res["seconds"]
        summary = [ln for ln in r.stderr.splitlines() if ln.startswith("steps ")]
        assert len(summary) == 1 and f"{res['tokens']:,} tokens in" in summary[0], r.stderr
        assert f"{res['tokens_per_second']:,.0f} tok/s" in summary[0]
        results.append(res)
    fresh, resumed = results
    assert fresh["tokens"] == fresh["total_tokens"] == 2 * 2 * 32
    assert resumed["tokens"] == 3 * 2 * 32 and resumed["total_tokens"] == 5 * 2 * 32


def test_npy_without_its_meta_file_trains_with_a_warning(ckpt, data, tmp_path):
    """The vocabulary check needs corpus.meta.json: without it the run goes on and says it could not check."""
    r = CliRunner().invoke(get_app(), ["tokenize", str(ckpt), "--data", str(data), "-o", str(tmp_path / "c.npy")])
    assert r.exit_code == 0, r.output
    args = ["train", str(ckpt), "--data", str(tmp_path / "c.npy"), "--block", "4", *SMALL]
    r = CliRunner().invoke(get_app(), [*args, "-o", str(tmp_path / "checked")])
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output
    (tmp_path / "c.meta.json").unlink()
    r = CliRunner().invoke(get_app(), [*args, "-o", str(tmp_path / "unchecked")])
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    assert r.exit_code == 0 and len(warnings) == 1, r.output
    assert "no c.meta.json" in warnings[0] and "vocabulary could not be checked" in warnings[0]


@pytest.mark.parametrize("case, needle", [
    ("text named .npy", "is not a .npy array of token ids"),
    ("object array", "holds an array of Python objects, not token ids"),
])
def test_a_file_that_is_no_token_array_is_refused_without_talk_of_unpickling(ckpt, tmp_path, case, needle):
    """numpy's message ("contains pickled (object) data ... load it unsafely using allow_pickle=") pointed users
    at unpickling a file that is no token stream at all."""
    path = tmp_path / "x.npy"
    if case == "text named .npy":
        path.write_text(TEXT)
    else:
        np.save(path, np.array([1, "a", None], dtype=object), allow_pickle=True)
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(path), "-o", str(tmp_path / "o"),
                                       "--block", "4", *SMALL])
    line = one_error(r)
    assert needle in line and "pickle" not in line.replace("run code", ""), line
    assert "twotower tokenize" in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["out is a folder", "out is a link to the data", "meta is the data"])
def test_tokenize_never_replaces_a_folder_or_the_data_it_reads(ckpt, data, tmp_path, case):
    """-o naming a folder (with --force it tokenized everything, removed the old meta file, then failed on
    the rename), or the data file under another name: one Error line, every file as it was."""
    work = tmp_path / "w"
    work.mkdir()
    text = work / "a.txt"
    out = work / "c.npy"
    if case == "out is a folder":
        text.write_text(TEXT)
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        (work / "c.meta.json").write_text("{}")
    elif case == "out is a link to the data":
        out.write_text(TEXT)  # the user's text, under a .npy name, read through a link named a.txt
        text.symlink_to(out)
    else:
        text = work / "c.meta.json"
        text.write_text(TEXT)
    before = tree(work)
    r = CliRunner().invoke(get_app(), ["tokenize", str(ckpt), "--data", str(text), "-o", str(out), "--force"])
    line = one_error(r)
    assert ("is a folder" if case == "out is a folder" else "would replace the data file") in line
    assert tree(work) == before


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_disk_too_small_for_the_saves_is_said_at_the_start(ckpt, data, tmp_path, monkeypatch, dtype):
    """Each save is the weights plus the optimizer state (and fp32 masters for narrower weights), and a save
    that replaces an earlier one is written beside it: with less free space than that, one `Warning:` before
    the first step, with an estimate close to what the saves write; the run goes on."""
    import re
    from collections import namedtuple

    src = ckpt
    if dtype == "bf16":
        from twotower_cli.checkpoint import write_checkpoint

        src = tmp_path / "bf16"
        write_checkpoint(src, {k: v if k.endswith(("A_log", "mixer.D", "dt_bias")) else v.bfloat16()
                               for k, v in tensors(ckpt).items()},
                         json.loads((ckpt / "config.json").read_text()),
                         extra_files=[ckpt / "tokenizer.json", ckpt / "tokenizer_config.json"])
    free = {"bytes": 1000}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10**12, 0, free["bytes"]))
    out = tmp_path / "o"
    args = ["train", str(src), "--data", str(data), "-o", str(out), "--block", "4", "--seq-len", "32", "--batch", "2",
            "--steps", "2", "--save-every", "1", "--warmup", "0", "--eval-every", "0", "--device", "cpu"]
    r = CliRunner().invoke(get_app(), args)
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())
    m = re.search(r"Warning: each save writes about ([\d.]+) MB beside (\S+) \(the new one beside the previous one "
                  r"until it is complete\), and that disk has 1,000 B free", said)
    assert m and m[2] == str(out) and r.stderr.count("Warning:") == 1, r.stderr
    estimate = float(m[1]) * 1e6
    saved = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".safetensors", ".pt"))
    assert 0.85 < estimate / saved < 1.05, (estimate, saved)  # tiny tensors: torch.save adds ~8 % around them
    free["bytes"] = int(2 * estimate) + 10**4  # room for two saves: nothing to say, resuming or not
    r = CliRunner().invoke(get_app(), [*args[:-8], "--steps", "3", "--resume", "--device", "cpu"])
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output


def test_a_batch_too_large_for_host_memory_is_said_as_such(ckpt, data, tmp_path):
    """torch's CPU allocator fails with a RuntimeError ("DefaultCPUAllocator: can't allocate memory"), not
    Python's MemoryError: `train --batch 99999999999` ended with that text and the hint "this looks like a bug".
    Now it says how much it tried to allocate and what makes room, and writes no OUT."""
    out = tmp_path / "out"
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(data), "-o", str(out), "--block", "4",
                                       "--seq-len", "32", "--batch", "99999999999", "--steps", "1",
                                       "--eval-every", "0", "--device", "cpu"])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
    assert r.exit_code == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: out of host memory: tried to allocate "), lines
    assert lines[0].endswith("(hint: try a smaller --batch or --seq-len, or --gradient-checkpointing)"), lines
    assert "bug" not in lines[0] and "DefaultCPUAllocator" not in lines[0] and not out.exists()


@pytest.mark.parametrize("which", ["data", "eval-data", "meta", "checkpoint"])
def test_a_log_the_run_reads_is_refused_before_anything_is_written(ckpt, data, tmp_path, which):
    """--log is appended to: given the --data file, the corpus gained the log's lines; given a file of the
    checkpoint (config.json), the checkpoint no longer loaded after the run. Each is refused up front and
    the file is left as it was."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    source = tmp_path / "ckpt"
    shutil.copytree(ckpt, source)
    args = ["--data", str(corpus)]
    if which == "meta":
        tokens = tmp_path / "c.npy"
        r = CliRunner().invoke(get_app(), ["tokenize", str(source), "--data", str(corpus), "-o", str(tokens)])
        assert r.exit_code == 0, r.output
        args, log = ["--data", str(tokens)], T.token_file_meta(tokens)
    elif which == "eval-data":
        held = tmp_path / "held.txt"
        held.write_text(TEXT)
        args, log = [*args, "--eval-data", str(held)], held
    else:
        log = corpus if which == "data" else source / "config.json"
    before = log.read_bytes()
    out = tmp_path / "out"
    r = CliRunner().invoke(get_app(), ["train", str(source), *args, "-o", str(out), "--log", str(log), "--block",
                                       "4", "--seq-len", "32", "--steps", "1", "--eval-every", "0", "--device", "cpu"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: --log {log} "), r.output
    assert ("lies inside the checkpoint" if which == "checkpoint" else "the log is appended to") in lines[0]
    assert log.read_bytes() == before and not out.exists()


def test_resume_refuses_other_data_of_the_same_size_and_names_what_differs(ckpt, data, tmp_path):
    """Only the counts were compared: the corpus reversed (or another shard of the same length) resumed and
    trained on other data, and another --eval-data of the same size made eval's before → after measure two
    sets. A hash of evenly spaced sequences tells them apart, and the error names which data differs."""
    r = CliRunner().invoke(get_app(), ["tokenize", str(ckpt), "--data", str(data), "-o", str(tmp_path / "c.npy")])
    assert r.exit_code == 0, r.output
    stream = np.load(tmp_path / "c.npy")
    np.save(tmp_path / "rev.npy", stream[::-1].copy())
    shutil.copy(T.token_file_meta(tmp_path / "c.npy"), T.token_file_meta(tmp_path / "rev.npy"))
    np.save(tmp_path / "held.npy", stream[:200])
    np.save(tmp_path / "held2.npy", stream[200:400])
    for name in ("held", "held2"):
        shutil.copy(T.token_file_meta(tmp_path / "c.npy"), T.token_file_meta(tmp_path / f"{name}.npy"))
    out = tmp_path / "out"
    run(ckpt, tmp_path / "c.npy", out, steps=4, stop_after=2, eval_data=[tmp_path / "held.npy"])
    with pytest.raises(TwoTowerError, match=r"^cannot resume: the training data differs from the saved run's"):
        run(ckpt, tmp_path / "rev.npy", out, steps=4, resume=True, eval_data=[tmp_path / "held.npy"])
    with pytest.raises(TwoTowerError, match=r"^cannot resume: the held-out data differs from the saved run's"):
        run(ckpt, tmp_path / "c.npy", out, steps=4, resume=True, eval_data=[tmp_path / "held2.npy"])
    with pytest.raises(TwoTowerError) as err:  # no --eval-data: the last 5 % of --data is held out
        run(ckpt, tmp_path / "c.npy", out, steps=4, resume=True)
    assert err.value.message.startswith("cannot resume: the training sequences number ") and "5 %" in err.value.hint
    assert run(ckpt, tmp_path / "c.npy", out, steps=4, resume=True, eval_data=[tmp_path / "held.npy"]).start_step == 2


def test_resume_holds_a_state_saved_before_fingerprints_to_its_counts(ckpt, data, tmp_path):
    out = tmp_path / "out"
    run(ckpt, data, out, steps=4, stop_after=2)
    state = torch.load(out / T.TRAINER_STATE, weights_only=True)
    assert set(state["data"]) >= {"train_fingerprint", "eval_fingerprint"}
    state["data"] = {k: v for k, v in state["data"].items() if not k.endswith("fingerprint")}
    torch.save(state, out / T.TRAINER_STATE)
    assert run(ckpt, data, out, steps=4, resume=True).start_step == 2


def test_resume_says_the_checkpoint_given_is_not_read_and_keeps_the_runs_source(ckpt, data, tmp_path):
    """--resume continues OUT; the CKPT given was ignored without a word (a path that does not exist, or a plain
    NemotronH checkpoint train would refuse), and the record then named it as the run's source."""
    out = tmp_path / "out"
    args = ["--data", str(data), "-o", str(out), "--block", "4", "--seq-len", "32", "--batch", "4", "--steps", "4",
            "--eval-every", "0", "--device", "cpu"]
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), *args, "--stop-after", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(get_app(), ["train", str(tmp_path / "nowhere"), *args, "--resume"])
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    assert warnings == [f"Warning: resuming {out}, trained from {ckpt}: the checkpoint given, {tmp_path / 'nowhere'}, "
                        f"is not read (hint: the run goes on from {out}'s own weights)"], r.stderr
    assert torch.load(out / T.TRAINER_STATE, weights_only=True)["settings"]["source"] == str(ckpt)


@pytest.mark.parametrize(("command", "first", "model"), [
    ("train", "tiny", "tiny"), ("tokenize", "tiny", "tiny-base"), ("train", "{ckpt}", "tiny")])
def test_a_checkpoint_given_twice_is_said_as_such(ckpt, data, tmp_path, command, first, model):
    """`train tiny -m tiny`: with -m, the first argument is read as a data file, and the error was "data file tiny
    does not exist (hint: check the --data paths)"."""
    out = tmp_path / ("o.npy" if command == "tokenize" else "o")
    first = first.format(ckpt=ckpt)
    r = CliRunner().invoke(get_app(), [command, first, "-m", model, "--data", str(data), "-o", str(out)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: two checkpoints given: {first} and -m {model} (hint: give it once"), lines
    assert not out.exists()


def test_eval_data_that_is_also_data_is_warned_of(ckpt, data, tmp_path):
    """The held-out measure of a file the run trains on says nothing about generalisation: it ran without a word."""
    r = CliRunner().invoke(get_app(), ["train", str(ckpt), "--data", str(data), "--eval-data", str(data), "-o",
                                       str(tmp_path / "o"), "--block", "4", "--seq-len", "32", "--steps", "1",
                                       "--eval-every", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    assert warnings == [f"Warning: --eval-data {data} is also --data: the eval loss measures text the run trains on "
                        "(hint: hold out a file of its own, or leave out --eval-data (the last 5 % of --data is held "
                        "out))"], r.stderr


def test_resuming_a_finished_run_says_there_was_nothing_to_do(ckpt, data, tmp_path):
    """Its summary said "saved OUT" though no step ran and nothing was written."""
    out = tmp_path / "out"
    args = ["train", str(ckpt), "--data", str(data), "-o", str(out), "--block", "4", "--seq-len", "32", "--steps", "2",
            "--eval-every", "0", "--device", "cpu"]
    assert CliRunner().invoke(get_app(), args).exit_code == 0
    written = (out / "model.safetensors").stat().st_mtime_ns
    r = CliRunner().invoke(get_app(), [*args, "--resume"])
    said = " ".join(r.stderr.split())
    assert r.exit_code == 0 and f"nothing to do: {out} holds step 2 of 2 (raise --steps to train on)" in said, said
    assert "saved" not in said and (out / "model.safetensors").stat().st_mtime_ns == written


def test_an_eval_loss_that_is_not_a_number_is_shown_as_a_dash(ckpt, data, tmp_path):
    """The summary, --json and --log said "-" or null for it; the progress lines said "eval loss nan"."""
    poisoned = with_nan(ckpt, tmp_path / "nan", ("context_lm_head.weight", "lm_head.weight"))
    r = CliRunner().invoke(get_app(), ["train", str(poisoned), "--data", str(data), "-o", str(tmp_path / "o"),
                                       "--block", "4", "--seq-len", "32", "--steps", "2", "--eval-every", "1",
                                       "--device", "cpu"])
    evals = [ln for ln in r.stderr.splitlines() if ": eval loss " in ln]
    assert evals and all(ln.endswith(": eval loss -") for ln in evals), r.stderr
    assert "loss nan" not in r.stderr.replace("the loss is nan", ""), r.stderr  # (the skip Warning names it)
