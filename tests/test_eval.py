"""`twotower eval`: the AR measure against a full forward and a shifted cross-entropy, the masked-diffusion
loss against the per-block reference of spec §8 (tests/test_train_loss.py) and against `train`'s own
evaluation of the same data, the t buckets against the reference's per-token terms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tests.test_train_loss import reference_terms
from tests.twotower_helpers import random_base, tiny_cfg, with_nan, write_base, write_random_twotower
from typer.testing import CliRunner

from twotower_cli import train as T
from twotower_cli.cli import get_app
from twotower_cli.errors import TwoTowerError
from twotower_cli.evaluate import T_EDGES, evaluate
from twotower_cli.text import Tokenizer
from twotower_cli.towers import causal_lm_view, load_model

TEXT = "the quick brown fox jumps over the lazy dog. " * 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_twotower(tmp_path_factory.mktemp("ev") / "tt")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("evdata") / "held.txt"
    path.write_text(TEXT)
    return path


def sequences(folder, data, seq_len):
    tok = Tokenizer(folder)
    ids = tok.encode(TEXT) + [2]  # one document, then EOS, as train packs it
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


@pytest.mark.parametrize("head_rows", [2048, 7])  # 7: the head in pieces that do not divide the positions
def test_the_ar_measure_is_the_shifted_cross_entropy_of_a_full_forward(folder, data, monkeypatch, head_rows):
    from twotower_cli import evaluate as E

    monkeypatch.setattr(E, "AR_HEAD_ROWS", head_rows)
    r = evaluate(str(folder), [data], seq_len=64, block=4, batch=3, max_sequences=5)
    ids = sequences(folder, data, 64)[:5]
    ar = causal_lm_view(load_model(folder, need_denoiser=True).twotower)
    with torch.no_grad():
        logits = ar(ids)  # [n, 64, V]: every position at once, the head on all of them
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1))
    assert r.sequences == 5 and r.ar_tokens == 5 * 63
    assert abs(r.ar_nll - want.item()) <= 1e-5 and r.ar_perplexity == pytest.approx(torch.exp(want).item())


@pytest.mark.parametrize("per", ["sequence", "block"])
def test_the_diffusion_loss_and_its_t_buckets_are_the_per_block_references(folder, data, per):
    r = evaluate(str(folder), [data], seq_len=32, block=4, batch=4, max_sequences=6, seed=3, noise_per=per)
    ids = sequences(folder, data, 32)[:6]
    gen = torch.Generator().manual_seed(T.derive_seed(3, T._EVAL))
    noisy, mask, _ = T.add_noise(ids, 4, 3, gen, per)
    model = load_model(folder, need_denoiser=True).twotower
    with torch.no_grad():
        terms = reference_terms(model, ids, noisy, mask, 4)
    assert r.masked_tokens == len(terms) == int(mask.sum())
    assert abs(r.diffusion_loss - torch.stack([ce for ce, _ in terms]).mean().item()) <= 1e-5
    lo = 0.0
    for bucket, hi in zip(r.by_t, T_EDGES, strict=True):
        mine = [ce for ce, t in terms if lo < t <= hi]
        assert bucket["t_max"] == hi and bucket["tokens"] == len(mine)
        if mine:
            assert abs(bucket["loss"] - torch.stack(mine).mean().item()) <= 1e-5
        lo = hi
    assert sum(b["tokens"] for b in r.by_t) == r.masked_tokens


def test_the_diffusion_loss_is_what_train_reports_before_its_first_step(folder, data, tmp_path):
    """eval on a file == train's eval loss before training, with that file as --eval-data and the same seed,
    --seq-len, block and noise."""
    run = T.train(T.TrainConfig(checkpoint=folder, data=[data], out=tmp_path / "o", block=4, seq_len=32, batch=4,
                                steps=1, warmup=0, eval_every=0, save_every=0, device="cpu", seed=5,
                                eval_data=[data], noise_per="block"))
    r = evaluate(str(folder), [data], seq_len=32, block=4, max_sequences=1000, seed=5, noise_per="block")
    assert abs(r.diffusion_loss - run.eval_loss_before) <= 1e-5


def test_a_perplexity_too_large_for_a_float_is_infinite_and_null_in_json():
    """exp(NLL) past ~709 overflows a float: inf in the report, null in --json (JSON has no Infinity)."""
    from twotower_cli.evaluate import EvalResult

    assert EvalResult("m", 1, 8, 700.0, 7).ar_perplexity == pytest.approx(math.exp(700.0))
    huge = EvalResult("m", 1, 8, 800.0, 7)
    assert huge.ar_perplexity == math.inf
    out = json.loads(json.dumps(huge.to_json(), allow_nan=False))
    assert out["ar_perplexity"] is None and out["ar_nll"] == 800.0


def test_a_plain_checkpoint_gets_the_ar_measure_only(tmp_path, data):
    base = write_base(tmp_path / "base", random_base(tiny_cfg(), 11))
    r = evaluate(str(base), [data], seq_len=64, max_sequences=3)
    assert r.diffusion_loss is None and r.block is None and r.ar_tokens == 3 * 63
    with pytest.raises(Exception, match="no denoiser to give a block"):
        evaluate(str(base), [data], seq_len=64, block=4)


def invoke(*args):
    return CliRunner().invoke(get_app(), ["eval", *args])


def test_cli_json_and_human_report(folder, data):
    r = invoke("--model", str(folder), "--data", str(data), "--seq-len", "32", "--block", "4", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    want = evaluate(str(folder), [data], seq_len=32, block=4)
    assert out["ar_nll"] == want.ar_nll and out["diffusion_loss"] == want.diffusion_loss
    assert out["ar_perplexity"] == want.ar_perplexity and len(out["by_t"]) == len(T_EDGES)
    human = invoke("--model", str(folder), "--data", str(data), "--seq-len", "32", "--block", "4")
    lines = human.stderr.splitlines()
    assert human.exit_code == 0 and human.stdout == ""
    assert lines[1].startswith(f"AR (context tower and its head): NLL {want.ar_nll:.4f}")
    assert lines[2].startswith(f"masked diffusion (block 4, t per sequence, seed 0): loss {want.diffusion_loss:.4f}")
    assert lines[3].strip().startswith("t in (0, 0.25]:")


@pytest.mark.parametrize(("args", "needle"), [
    ((), "no data files given"),
    (("--seq-len", "30", "--block", "4"), "--seq-len 30 is not a multiple of the block size 4"),
    (("--seq-len", "4096"), "fewer tokens than one sequence"),
    (("--noise-per", "doc"), "--noise-per 'doc'"),
    (("--batch", "0"), "--batch must be at least 1"),
    (("--batch-size", "0"), "--batch must be at least 1"),  # generate's and bench's name for it
    (("--block", "0"), "--block must be at least 1, not 0 (hint: leave it out"),  # blamed --seq-len 512
    (("--block", "-4"), "--block must be at least 1, not -4"),
    (("--seed", "-1"), "--seed -1 is out of range (hint: use a seed from 0 to 2**64 - 1)"),
    (("--seed", str(2**64)), f"--seed {2**64} is out of range"),  # was taken: train and eval hash seeds
])
def test_cli_errors_are_one_line(folder, data, args, needle):
    extra = () if not args else ("--data", str(data))
    r = invoke("--model", str(folder), *extra, *args)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output, r.output


@pytest.mark.parametrize(("poisoned", "needle"), [
    (("denoiser_tower.norm_f.weight",), "the denoiser's losses are NaN or infinite"),  # a diverged training run
    (("context_tower.norm_f.weight",), "the context tower's log-probabilities are NaN or infinite"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_nan_weights_are_one_error_line_naming_the_tower_not_a_nan_report(folder, data, tmp_path, poisoned, needle,
                                                                          as_json):
    """A NaN weight makes the numbers NaN: eval says which tower's outputs are, and exits 1, rather than report
    nan (and, with --json, NaN, which is not JSON)."""
    bad = with_nan(folder, tmp_path / "nan", poisoned)
    r = invoke("--model", str(bad), "--data", str(data), "--seq-len", "32", "--block", "4",
               *(("--json",) if as_json else ()))
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and needle in errors[0] and "inspect --values" in errors[0], r.output
    assert r.stdout == "" and "Traceback" not in r.output


def test_eval_places_the_towers_as_generate_does(folder, data, monkeypatch):
    """--context-device / --denoiser-device reach the loader; on one CPU the numbers are those without them."""
    from twotower_cli import towers

    seen = {}
    real = towers.load_model

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(towers, "load_model", spy)
    placed = evaluate(str(folder), [data], seq_len=32, block=4, context_device="cpu", denoiser_device="cpu")
    assert (str(seen["context_device"]), str(seen["denoiser_device"])) == ("cpu", "cpu")
    plain = evaluate(str(folder), [data], seq_len=32, block=4)
    assert (placed.ar_nll, placed.diffusion_loss) == (plain.ar_nll, plain.diffusion_loss)
    r = invoke("--model", str(folder), "--data", str(data), "--seq-len", "32", "--context-device", "cuda:5")
    assert r.exit_code == 1 and "cuda:5" in r.stderr and "Traceback" not in r.output


def test_a_data_folder_is_named_as_one(folder, tmp_path):
    r = invoke("--model", str(folder), "--data", str(tmp_path))
    assert r.exit_code == 1 and f"data file {tmp_path} is a folder, not a file" in r.stderr, r.output


def test_a_missing_data_file_is_said_before_the_model_is_fetched(monkeypatch, tmp_path):
    """A typo in --data fails at once, not after a hub checkpoint's download (tens of GB)."""
    from twotower_cli import runtime

    def fetch(*a, **k):
        raise AssertionError("fetched the model before checking the data")

    monkeypatch.setattr(runtime, "fetch_model", fetch)
    with pytest.raises(TwoTowerError, match=f"data file {tmp_path / 'typo.txt'} does not exist"):
        evaluate("nvidia/Nemotron-Labs-TwoTower", [tmp_path / "typo.txt"])


def test_a_checkpoint_named_first_as_train_takes_it_points_at_m(folder, data):
    """`eval CKPT --data FILE` (train's order): the checkpoint is named as one, and the hint says -m."""
    r = invoke(str(folder), "--data", str(data))
    assert r.exit_code == 1 and r.stderr.splitlines() == [
        f"Error: {folder} is a checkpoint folder, not a data file (hint: the checkpoint goes with -m, as in "
        "`twotower eval -m CKPT --data FILE`)"], r.output
    r = invoke("-m", str(folder), "--data", str(data), "other.txt")  # with -m: a data file that is not there
    assert r.exit_code == 1 and "data file other.txt does not exist (hint: check the --data paths" in r.stderr


def test_options_of_the_diffusion_measure_on_a_plain_checkpoint_are_warned_of(tmp_path, data):
    """On a plain NemotronH checkpoint only the AR measure runs: --block was refused, --noise-per and --seed
    were taken without a word (and --json reported the seed as if it had been used)."""
    base = write_base(tmp_path / "base", random_base(tiny_cfg(), 1))
    r = invoke("--model", str(base), "--data", str(data), "--noise-per", "block", "--seed", "5")
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    assert warnings == [f"Warning: --{o}: no effect on base, a plain NemotronH checkpoint: eval gives the AR measure "
                        "only (hint: leave it out)" for o in ("noise-per", "seed")], r.stderr
    assert "Warning" not in invoke("--model", str(base), "--data", str(data)).stderr
