"""`twotower bench` on a random tiny two-tower model: the documented JSON, and the quality arithmetic."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tests.twotower_helpers import add_chat, random_base, reshard, tiny_cfg, write_base, write_twotower
from typer.testing import CliRunner

from twotower_cli.bench import run_bench
from twotower_cli.cli import get_app
from twotower_cli.towers import TowerBackend, load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = tiny_cfg()
    return write_twotower(tmp_path_factory.mktemp("b") / "tt", random_base(cfg, 21), "random",
                          denoiser=random_base(cfg, 22))


def test_bench_json_fields(folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nthe cat\n")
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "--prompts", str(prompts), "-n", "8",
                                       "--block", "4", "--thresholds", "0.5,0.9", "--repeat", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) >= {"rows", "settings", "machine"}
    assert [(x["mode"], x["threshold"]) for x in out["rows"]] == [
        ("ar", None), ("mock_ar", None), ("mask_diffusion", 0.5), ("mask_diffusion", 0.9)]
    for row in out["rows"]:
        for key in ("mode", "threshold", "tokens_per_second", "nfe", "tokens_per_nfe", "speedup_vs_ar", "quality_vs_ar"):
            assert key in row
        assert row["tokens_per_second"] > 0 and row["nfe"] > 0
    assert out["rows"][0]["speedup_vs_ar"] == 1.0 and out["rows"][0]["quality_vs_ar"] == 1.0
    # --prompts -: the same prompts from stdin (as generate's --prompt-file -), the same tokens and NFE
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "--prompts", "-", "-n", "8", "--block", "4",
                                       "--thresholds", "0.5,0.9", "--repeat", "1", "--json"], input="hello\nthe cat\n")
    assert r.exit_code == 0, r.output
    assert [(x["tokens"], x["nfe"]) for x in json.loads(r.stdout)["rows"]] == [(x["tokens"], x["nfe"]) for x in out["rows"]]
    assert out["settings"]["prompts"] == 2 and out["settings"]["block"] == 4
    assert (out["settings"]["compile"], out["settings"]["cuda_graphs"], out["settings"]["graph_captures"]) == (False, False, 0)
    # generate's spellings: --prompt-file, and --threshold for one threshold
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "--prompt-file", str(prompts), "-n", "8",
                                       "--block", "4", "--threshold", "0.9", "--repeat", "1", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [(x["mode"], x["threshold"], x["nfe"]) for x in rows] == [
        (x["mode"], x["threshold"], x["nfe"]) for x in out["rows"] if x["threshold"] in (None, 0.9)]
    assert out["settings"]["devices"] == {"context": "cpu", "denoiser": "cpu"}


def test_bench_chat_reads_the_prompts_through_the_template(folder, tmp_path, monkeypatch):
    """`bench --chat` (instruct models): every row samples the prompts as generate --chat renders them (the
    reference: the template rendered by hand, encoded without added special tokens), --system first; a
    messages list is a whole conversation; --system without --chat is refused before the load."""
    import shutil

    from twotower_cli import bench
    from twotower_cli.text import ChatTemplate, Tokenizer

    chat_folder = add_chat(shutil.copytree(folder, tmp_path / "chat"))
    f = tmp_path / "p.jsonl"
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "so?"}]
    f.write_text(json.dumps({"prompt": "hello there"}) + "\n" + json.dumps({"messages": talk}) + "\n")
    seen = []
    real = bench.S.run

    def spy(backend, prompts, *a, **k):
        seen.extend(map(list, prompts))
        return real(backend, prompts, *a, **k)

    monkeypatch.setattr(bench.S, "run", spy)
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(chat_folder), "--prompts", str(f), "--chat",
                                       "--system", "be brief.", "-n", "4", "--block", "4", "--thresholds", "0.8",
                                       "--repeat", "1", "--json"])
    assert r.exit_code == 0, r.output
    tok, template = Tokenizer(chat_folder), ChatTemplate.load(chat_folder)
    system = [{"role": "system", "content": "be brief."}]
    want = [tok.encode(template.render(system + m), add_special_tokens=False)
            for m in ([{"role": "user", "content": "hello there"}], talk)]
    assert seen and all(p in want for p in seen) and want[1] in seen
    assert json.loads(r.stdout)["settings"]["chat"] is True
    refused = CliRunner().invoke(get_app(), ["bench", "--model", str(chat_folder), "--system", "x"])
    assert refused.exit_code == 1 and refused.stderr.startswith("Error: --system and --chat-arg"), refused.output


def test_bench_places_the_towers_as_generate_does(folder, monkeypatch):
    """--context-device / --denoiser-device reach the loader (one tower per GPU for the 30B model on 80 GB
    cards) and the settings say where each tower ran; on CPU the same tokens as without them."""
    from twotower_cli import runtime
    from twotower_cli.errors import TwoTowerError

    common = ["bench", "--model", str(folder), "-n", "8", "--block", "4", "--thresholds", "0.8", "--repeat", "1",
              "--json"]
    seen = {}

    def spy(*a, **k):
        seen.update(k)
        raise TwoTowerError("stopped before the load", "a test")

    with monkeypatch.context() as m:
        m.setattr(runtime, "open_runtime", spy)
        r = CliRunner().invoke(get_app(), [*common, "--context-device", "cuda:0", "--denoiser-device", "cuda:1"])
    assert r.exit_code == 1 and (seen["context_device"], seen["denoiser_device"]) == ("cuda:0", "cuda:1")
    placed = CliRunner().invoke(get_app(), [*common, "--context-device", "cpu", "--denoiser-device", "cpu"])
    assert placed.exit_code == 0, placed.output
    plain = CliRunner().invoke(get_app(), common)
    rows = [[(x["tokens"], x["nfe"]) for x in json.loads(r.stdout)["rows"]] for r in (placed, plain)]
    assert rows[0] == rows[1]



def test_bench_block_defaults_to_the_checkpoints_and_a_larger_one_warns(folder):
    common = ["bench", "--model", str(folder), "-n", "4", "--thresholds", "0.9", "--repeat", "1", "--json"]
    r = CliRunner().invoke(get_app(), common)
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output
    assert json.loads(r.stdout)["settings"]["block"] == 4  # write_twotower records block_size 4
    r = CliRunner().invoke(get_app(), [*common, "--block", "8"])
    assert r.exit_code == 0 and json.loads(r.stdout)["settings"]["block"] == 8, r.output
    assert "Warning: block 8 is larger than the block this denoiser was trained with (4" in r.stderr


def test_bench_in_batches_counts_the_same_tokens_nfe_and_quality(folder, tmp_path):
    """--batch-size 3 over 4 prompts (a batch of 3, then 1): greedy tokens do not depend on the batch, and
    tokens/NFE counts the forwards each sequence needed (not those its batch ran for the others), so every
    row but tok/s matches batch size 1 (tests/test_sampler.py pins the per-sequence NFE itself)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nthe cat\nabc abc\nx\n")
    common = ["bench", "--model", str(folder), "--prompts", str(prompts), "-n", "8", "--thresholds", "0.05,0.5",
              "--repeat", "1", "--json"]
    one, three = (json.loads(CliRunner().invoke(get_app(), [*common, "--batch-size", n]).stdout) for n in ("1", "3"))
    assert three["settings"]["batch_size"] == 3
    for a, b in zip(one["rows"], three["rows"], strict=True):
        assert (a["mode"], a["nfe"], a["tokens_per_nfe"]) == (b["mode"], b["nfe"], b["tokens_per_nfe"])
        assert a["quality_vs_ar"] == pytest.approx(b["quality_vs_ar"], rel=1e-9)
    assert one["rows"][2]["tokens_per_nfe"] > 1.2  # threshold 0.05: several tokens per step

def test_quality_is_the_judge_perplexity_ratio(folder):
    be = TowerBackend(load_model(folder, need_denoiser=True).twotower)
    prompts = [[5, 9, 11], [8, 30, 12, 14]]
    rows = run_bench(be, prompts, max_new_tokens=6, block=3, thresholds=[0.5], repeat=1)
    # recompute the ar row's mean log-likelihood with full forwards, one prefix at a time
    from twotower_cli import sampler as S

    lls = []
    for p in prompts:
        toks = S.run(be, [p], S.SamplingConfig(mode="ar", max_new_tokens=6)).generations[0].token_ids
        ids = p + toks
        for j in range(len(p), len(ids)):
            with torch.no_grad():
                logits = be.ar(torch.tensor([ids[:j]]))[0, -1]
            lls.append(F.log_softmax(logits, -1)[ids[j]].item())
    assert abs(rows[0].mean_log_likelihood - sum(lls) / len(lls)) < 1e-5
    for r in rows[1:]:
        assert abs(r.quality_vs_ar - math.exp(r.mean_log_likelihood - rows[0].mean_log_likelihood)) < 1e-12


def test_modes_that_write_no_tokens_have_no_quality_or_speed_up_and_json_stays_json(folder):
    """Every id an end id: no mode writes a token, so no likelihood, quality or speed-up can be measured.
    They are NaN in the rows, null in --json (strict JSON: no NaN), "-" in the table; the counts stay."""
    from twotower_cli.bench import rows_json
    from twotower_cli.display import number

    be = TowerBackend(load_model(folder, need_denoiser=True).twotower)
    rows = run_bench(be, [[5, 9, 11]], max_new_tokens=6, block=3, thresholds=[0.5], repeat=1,
                     eos_ids=list(range(be.vocab_size)))
    assert [r.tokens for r in rows] == [0, 0, 0] and all(r.nfe >= 1 for r in rows)
    out = json.loads(json.dumps(rows_json(rows), allow_nan=False))
    for row in out:
        assert (row["mean_log_likelihood"], row["quality_vs_ar"], row["speedup_vs_ar"]) == (None, None, None)
        assert row["tokens_per_second"] == 0.0 and row["nfe"] >= 1
    assert (number(rows[1].quality_vs_ar, ".3f"), number(0.25, ".2f", "×")) == ("-", "0.25×")


def test_bench_on_plain_base_has_only_ar(tmp_path):
    base = write_base(tmp_path / "base", random_base(tiny_cfg(), 3))
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(base), "-n", "4", "--repeat", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert [x["mode"] for x in json.loads(r.stdout)["rows"]] == ["ar"]
    # --steps beyond --block: nothing to refuse where only ar runs (it was 'Error: steps 9 must be between ...')
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(base), "-n", "4", "--repeat", "1", "--json",
                                       "--block", "4", "--steps", "9"])
    assert r.exit_code == 0, r.output
    assert [x["mode"] for x in json.loads(r.stdout)["rows"]] == ["ar"]
    # ... but they change nothing there: one Warning line each (they were ignored in silence)
    assert [ln.split(":")[1] for ln in r.stderr.splitlines() if ln.startswith("Warning:")] == [" --block", " --steps"]
    assert "a plain NemotronH checkpoint: bench times ar only" in r.stderr, r.stderr
    # the table alone had one ar row, with no word of why or of the rows it compares against; --thresholds
    # (the mask_diffusion rows') changed nothing without a word either
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(base), "-n", "4", "--repeat", "1",
                                       "--thresholds", "0.9"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())  # the human report wraps at the test console's width
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")] == [
        "Warning: --thresholds: no effect on base, a plain NemotronH checkpoint: bench times ar only (hint: leave "
        "it out)"], r.stderr
    assert (f"ar only: base is a plain NemotronH checkpoint; the mock_ar and mask_diffusion rows need a TwoTower "
            f"one: twotower split {base}") in said, said
    assert "block" not in said.split("┏")[0], said  # the title: ar has no block
    assert said.startswith("Warning: --thresholds") and "twotower bench · 8 prompts × 4 tokens · median of 1" in said
    one = tmp_path / "one.txt"
    one.write_text("ROMEO.\n")
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(base), "-n", "1", "--repeat", "1", "--prompts", str(one)])
    assert "twotower bench · 1 prompt × 1 token · median of 1" in " ".join(r.stderr.split()), r.stderr  # "1 prompts"


def test_bench_bad_thresholds(folder):
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "--thresholds", "a,b"])
    assert r.exit_code == 1 and r.stderr.startswith("Error:")
    # none at all ran ar and mock_ar only, and said nothing of the missing mask_diffusion rows
    for empty in ("", " , "):
        r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "--thresholds", empty, "-n", "4",
                                           "--repeat", "1"])
        assert r.exit_code == 1 and r.stderr == (
            f"Error: no thresholds in {empty!r} (hint: write them like 0.5,0.7,0.8,0.9)\n"), r.output


def test_bench_a_threshold_given_twice_is_one_row_and_a_warning(folder):
    """--thresholds 0.9,0.90 measured and printed the 0.9 row twice, each with its own noisy tok/s."""
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "-n", "4", "--block", "4", "--repeat", "1",
                                       "--thresholds", "0.9,0.5,0.90", "--json"], input="")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [(x["mode"], x["threshold"]) for x in out["rows"]] == [
        ("ar", None), ("mock_ar", None), ("mask_diffusion", 0.9), ("mask_diffusion", 0.5)]
    assert out["settings"]["thresholds"] == [0.9, 0.5]
    assert r.stderr.startswith("Warning: --thresholds gives 0.9 more than once: measured once (hint: "), r.stderr


@pytest.mark.parametrize("thresholds", ["0", "0.5,0", "1.5"])
def test_bench_threshold_out_of_range_is_refused_as_generate_refuses_it(folder, thresholds):
    """A threshold generate refuses is refused here too (0 ran as 0.8 and was reported as 0)."""
    want = CliRunner().invoke(get_app(), ["generate", "hi", "--model", str(folder), "--threshold",
                                          thresholds.split(",")[-1]])
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "--thresholds", thresholds, "-n", "4",
                                       "--block", "4", "--repeat", "1"])
    assert want.exit_code == 1 and r.exit_code == 1, r.output
    assert r.stderr.splitlines() == want.stderr.splitlines()


def test_bench_prompt_file_that_is_a_folder_is_named_as_one(folder, tmp_path):
    """--prompts DIR: said "does not exist" of a folder that exists; generate's --prompt-file says what it is."""
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "--prompts", str(tmp_path)])
    want = CliRunner().invoke(get_app(), ["generate", "--model", str(folder), "--prompt-file", str(tmp_path)])
    assert r.exit_code == want.exit_code == 1 and r.stderr == want.stderr
    assert r.stderr == f"Error: prompt file {tmp_path} is a folder, not a file (hint: check the path)\n"
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "--prompts", str(folder)])
    assert r.stderr == f"Error: {folder} is a checkpoint folder, not a prompt file (hint: check the path)\n"


def test_bench_prompt_file_that_is_not_utf8_is_one_error_line(folder, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ROMEO \xff.\n")
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "--prompts", str(bad)])
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: prompt file {bad} is not UTF-8 text"), r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_bench_max_new_tokens_zero_hints_at_benchs_own_default(folder):
    """-n 0 said "(hint: try 128)", generate's default, where bench's is 64."""
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "-n", "0"])
    assert r.exit_code == 1 and r.stderr.strip() == "Error: max-new-tokens 0 must be at least 1 (hint: try 64)", r.output


@pytest.mark.parametrize("args, message, before", [
    (["--thresholds", "0.5,95"], "threshold 95.0 must be in (0, 1] (hint: NVIDIA's operating point is 0.8)", "fetch_model"),
    (["--block", "0"], "block size 0 must be at least 1 (hint: try --block 16)", "fetch_model"),
    (["--repeat", "0"], "repeat 0 must be at least 1 (hint: try --repeat 3)", "fetch_model"),
    (["--batch-size", "0"], "batch size 0 must be at least 1 (hint: try --batch-size 1)", "fetch_model"),
    # --steps once the checkpoint is known to be a TwoTower (a plain one runs no row that uses it)
    (["--block", "4", "--steps", "5"],
     "steps 5 must be between 1 and the block size 4 (hint: steps per block cannot exceed the tokens in a block)",
     "open_runtime"),
    # said "ar does not use it: leave it out", of the option the mask_diffusion rows use
    (["--steps", "0"], "steps 0 must be at least 1 (hint: try --steps 8)", "open_runtime"),
])
def test_bench_row_options_are_checked_before_the_model_is_fetched_or_loaded(folder, monkeypatch, args, message,
                                                                             before):
    """A typo in --thresholds, --block, --steps, --repeat or --batch-size failed only after the model was
    downloaded and loaded (minutes for the real one); generate checks its options first, and so does bench."""
    from twotower_cli import runtime

    def fail(*a, **k):
        raise AssertionError(f"called {before} before checking the options")

    monkeypatch.setattr(runtime, before, fail)
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "-n", "4", *args])
    assert r.exit_code == 1 and r.stderr == f"Error: {message}\n", r.output


def test_bench_steps_past_the_checkpoints_block_is_refused_after_the_load(folder):
    """Without --block the checkpoint's block (4 here) is known only after the load: --steps is held to it there."""
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(folder), "-n", "4", "--steps", "5", "--repeat", "1"])
    assert r.exit_code == 1 and r.stderr == (
        "Error: steps 5 must be between 1 and the block size 4 "
        "(hint: steps per block cannot exceed the tokens in a block)\n"), r.output


def test_bench_names_a_missing_shard(folder, tmp_path):
    """A TwoTower whose denoiser shard is gone was benched as a plain NemotronH checkpoint (its denoiser
    tensors unseen), then refused for 'tensor(s) missing'; now one Error line naming the shard."""
    from twotower_cli.checkpoint import open_checkpoint

    sharded = reshard(folder, tmp_path / "sharded")
    shard = open_checkpoint(sharded).tensors["denoiser_tower.embeddings.weight"].file
    (sharded / shard).unlink()
    r = CliRunner().invoke(get_app(), ["bench", "--model", str(sharded), "-n", "4", "--repeat", "1"])
    assert r.exit_code == 1 and r.stderr.strip() == (
        f"Error: checkpoint at {sharded} is incomplete: shard {shard} named in the index is missing (hint: "
        "re-download the checkpoint, or re-run the `twotower split` that wrote it)"), r.output
