"""Sampling on real (random tiny) two-tower models and the `twotower generate` command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tests.twotower_helpers import (
    add_chat,
    fed_through_a_pipe,
    random_base,
    reshard,
    tiny_cfg,
    with_nan,
    write_base,
    write_random_twotower,
)
from typer.testing import CliRunner

from twotower_cli import sampler as S
from twotower_cli.cli import get_app
from twotower_cli.text import Tokenizer
from twotower_cli.towers import TowerBackend, load_model


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A TwoTower whose denoiser differs from its context tower and whose time conditioning is not the
    identity, so mask_diffusion commits several tokens per step in varied orders."""
    folder = write_random_twotower(tmp_path_factory.mktemp("tt") / "tt")
    return folder


@pytest.fixture(scope="module")
def backend(trained_like):
    return TowerBackend(load_model(trained_like, need_denoiser=True).twotower)


PROMPTS = [[5, 9, 11, 7, 20, 6, 13], [8, 30], [12, 14, 16, 18]]


@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar", "ar"])
def test_batch_of_different_lengths_equals_one_at_a_time(backend, mode):
    cfg = S.SamplingConfig(mode=mode, block_size=4, threshold=0.3, max_new_tokens=14, temperature=0.0)
    together = S.run(backend, PROMPTS, cfg).generations
    for p, g in zip(PROMPTS, together, strict=True):
        alone = S.run(backend, [p], cfg).generations[0]
        assert g.token_ids == alone.token_ids, f"{mode}: batch {g.token_ids} vs alone {alone.token_ids}"


def test_same_seed_same_output_and_other_seed_differs(backend):
    cfg = S.SamplingConfig(block_size=4, threshold=0.5, max_new_tokens=24, temperature=1.0, top_p=0.95)
    a = S.run(backend, [PROMPTS[0]], cfg, generator=torch.Generator().manual_seed(7)).generations[0].token_ids
    b = S.run(backend, [PROMPTS[0]], cfg, generator=torch.Generator().manual_seed(7)).generations[0].token_ids
    c = S.run(backend, [PROMPTS[0]], cfg, generator=torch.Generator().manual_seed(8)).generations[0].token_ids
    assert a == b and a != c


def test_eos_cut_on_a_real_model(backend):
    cfg = S.SamplingConfig(block_size=4, threshold=0.5, max_new_tokens=16)
    free = S.run(backend, [PROMPTS[0]], cfg).generations[0].token_ids
    stop = free[5]
    first = free.index(stop)
    cut = S.run(backend, [PROMPTS[0]], S.SamplingConfig(block_size=4, threshold=0.5, max_new_tokens=16,
                                                        stop_ids=(stop,))).generations[0]
    assert cut.token_ids == free[:first] and cut.finish_reason == "eos"


@pytest.mark.hf
@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar", "ar"])
def test_until_ends_one_sequence_at_the_block_it_says(backend, mode):
    """`until` ends a sequence after the block (ar/mock_ar: token) where it first says so, with its ids
    uncut and finish_reason "stop"; the other sequences of the batch are untouched."""
    cfg = S.SamplingConfig(mode=mode, block_size=4, threshold=0.3, max_new_tokens=14)
    free = [S.run(backend, [p], cfg).generations[0] for p in PROMPTS[:2]]
    asked = []

    def until(i, ids):
        asked.append((i, len(ids)))
        return i == 0 and len(ids) >= 6

    got = None
    for ev in S.generate(backend, PROMPTS[:2], cfg, until=until):
        got = ev
    first, second = got.generations
    n = 8 if mode == "mask_diffusion" else 6  # the block that reaches 6 ids ends at 8
    assert first.finish_reason == "stop" and first.token_ids == free[0].token_ids[:n] and first.stop_id is None
    assert second.token_ids == free[1].token_ids and second.finish_reason == free[1].finish_reason
    assert max(length for i, length in asked if i == 0) == n  # not asked again once it ended


def test_ar_matches_transformers_greedy(tmp_path, hf_checkpoint, tiny_config):
    """`ar` on a transformers-written checkpoint == transformers' greedy decode, with transformers' dt
    clamp at time_step_min lifted to NVIDIA's (0, inf) (spec §9) on its mixers."""
    import math

    transformers = pytest.importorskip("transformers")
    folder = hf_checkpoint(tmp_path, tiny_config("M*EM-E"), sharded=True)
    from tests.twotower_helpers import write_char_tokenizer

    write_char_tokenizer(folder)
    hf = transformers.NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for m in hf.modules():
        if hasattr(m, "time_step_limit"):
            m.time_step_limit = (0.0, math.inf)
    ours = load_model(folder, need_denoiser=False)
    prompt = [5, 9, 11, 7]
    got = S.run(TowerBackend(ar=ours.ar), [prompt], S.SamplingConfig(mode="ar", max_new_tokens=24)).generations[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(24):  # plain full-recompute greedy loop on the transformers model
            nxt = hf(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert got.token_ids == ids[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(get_app(), ["generate", *args], input=input)


@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar", "ar"])
def test_cli_modes_json(trained_like, mode):
    r = invoke("hello", "--model", str(trained_like), "--mode", mode, "--block", "4", "-n", "9", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert obj["mode"] == mode and len(obj["token_ids"]) <= 9
    for key in ("text", "token_ids", "nfe", "tokens_per_nfe", "tokens_per_second", "wall_seconds", "settings"):
        assert key in obj
    assert obj["settings"]["block_size"] == 4
    assert obj["prompt_tokens"] == len(Tokenizer(trained_like).encode("hello"))  # what the model read


def _reference_stop(text: str, stop: str) -> tuple[str, bool]:
    """The slow obvious reference: the whole generation's text, cut at the stop text's first occurrence."""
    at = text.find(stop)
    return (text, False) if at < 0 else (text[:at], True)


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_cli_stop_text_ends_the_text_before_its_first_occurrence(trained_like, mode):
    """--stop-text against the free run cut by hand: a stop text made of the end of one token and the start
    of the next (mask_diffusion: of two blocks), the ids are those of the text before it, finish_reason
    "stop", and mask_diffusion runs no block after the one it appears in."""
    from twotower_cli.text import Tokenizer

    decode = Tokenizer(trained_like).decode
    common = ("hello", "--model", str(trained_like), "--mode", mode, "--block", "4", "--threshold", "0.3",
              "-n", "48", "--json")
    free = json.loads(invoke(*common).stdout)
    ids, text = free["token_ids"], free["text"]
    assert len(ids) == 48 and decode(ids) == text
    for blocks in (2, 10):  # 10: past the tokens a 4-character stop text is looked for in (`until`'s window)
        head = decode(ids[:4 * blocks])
        assert text.startswith(head) and 2 <= len(head) <= len(text) - 2
        check_stop(common, free, text[len(head) - 2:len(head) + 2], mode, decode, early=blocks == 2)
    long_stop = text[:len(decode(ids[:16])) + 1]  # from the first character to the fifth block
    check_stop(common, free, long_stop, mode, decode)


def check_stop(common, free, stop, mode, decode, early=False):
    ids, text = free["token_ids"], free["text"]
    r = invoke(*common, "--stop-text", stop)
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    want, found = _reference_stop(text, stop)
    assert found and got["text"] == want and got["finish_reason"] == "stop"
    kept = got["token_ids"]
    assert kept == ids[:len(kept)] and want.startswith(decode(kept)) and not want.startswith(decode(ids[:len(kept) + 1]))
    assert got["settings"]["stop_texts"] == [stop]
    if mode == "mask_diffusion" and early:  # written by block 3 of 12: the blocks after it are not run
        assert got["nfe"] < free["nfe"]
    plain = invoke(*common[:-1], "--stop-text", stop, "--no-live")
    assert plain.stdout == "hello" + want + "\n"


def test_cli_stop_text_in_a_batch_ends_only_the_prompts_that_write_it(trained_like, tmp_path):
    """Two prompts, continuous batching (and fixed batches, --events): each result is its own free run cut by
    the reference; the one that never writes the stop text runs to its length."""
    f = tmp_path / "p.txt"
    f.write_text("hello\nthe quick brown fox\n")
    common = ("--prompt-file", str(f), "--model", str(trained_like), "--block", "4", "--threshold", "0.3",
              "-n", "16", "--json")
    free = [json.loads(x) for x in invoke(*common).stdout.splitlines()]
    a, b = (o["text"] for o in free)
    stop = next(a[i:i + 3] for i in range(len(a) - 3) if a[i:i + 3] not in b)  # in the first only
    for extra in ((), ("--events",)):
        r = invoke(*common, *extra, "--stop-text", stop)
        assert r.exit_code == 0, r.output
        got = [json.loads(x) for x in r.stdout.splitlines() if "event" not in json.loads(x)]
        for o, g in zip(free, got, strict=True):
            want, found = _reference_stop(o["text"], stop)
            assert g["text"] == want and g["finish_reason"] == ("stop" if found else o["finish_reason"])
        assert [g["finish_reason"] for g in got] == ["stop", free[1]["finish_reason"]]
        assert got[1]["token_ids"] == free[1]["token_ids"]


def test_cli_empty_stop_text_is_one_error_line(trained_like):
    r = invoke("hello", "--model", str(trained_like), "--stop-text", "")
    assert r.exit_code == 1 and r.stderr.startswith("Error: --stop-text ''") and "Traceback" not in r.output


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_cli_weights_that_give_nan_logits_are_one_error_line(trained_like, tmp_path, mode):
    """A NaN weight (here each tower's final norm) makes every logit NaN: generate says so on one line and
    exits 1, rather than print the arbitrary ids argmax picks from NaN rows."""
    bad = with_nan(trained_like, tmp_path / "nan", ("context_tower.norm_f.weight", "denoiser_tower.norm_f.weight"))
    r = invoke("hello", "--model", str(bad), "--mode", mode, "-n", "8", "--no-live")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.stderr.startswith("Error: the model's logits are NaN or infinite") and "--dtype" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert invoke("hello", "--model", str(trained_like), "--mode", mode, "-n", "8", "--no-live").exit_code == 0


@pytest.mark.parametrize("extra", [(), ("--events",)])  # continuous batching; one fixed batch
def test_cli_stats_line_of_several_prompts_says_which_nfe_is_which(trained_like, tmp_path, extra):
    """Three prompts share each forward: the stats line's NFE is the batch's forwards, then their sum over the
    sequences (each prompt's `nfe` in --json), and tok/NFE is the tokens over that sum (it divided the tokens
    of all by the forwards of each before: a 3-prompt batch read 1.00 tok/NFE beside NFE 16 and 48 tokens)."""
    import re

    f = tmp_path / "p.txt"
    f.write_text("hello\nthe quick brown fox\nabc\n")
    common = ("--prompt-file", str(f), "--model", str(trained_like), "--block", "4", "--threshold", "0.3", "-n", "12")
    runs = [json.loads(x) for x in invoke(*common, "--json").stdout.splitlines()]
    summed, tokens = sum(o["nfe"] for o in runs), sum(len(o["token_ids"]) for o in runs)
    r = invoke(*common, "--json", *extra) if extra else invoke(*common, "--no-live")
    line = r.stderr.strip().splitlines()[-1]
    m = re.search(r"generated (\d+) tok · NFE (\d+) \((\d+) over the sequences\).* ([\d.]+) tok/NFE a sequence", line)
    assert m, line
    assert int(m[1]) == tokens and int(m[3]) == summed and int(m[2]) < summed
    assert m[4] == f"{tokens / summed:.2f}"


def test_cli_plain_text_and_stats_line(trained_like):
    r = invoke("hello", "--model", str(trained_like), "-n", "6", "--block", "4", "--no-live")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("hello")
    assert "tok/NFE" in r.stderr and "NFE" in r.stderr and "peak" in r.stderr


def test_cli_plain_text_is_written_as_it_is(trained_like):
    """The text on stdout is the prompt and the generation byte for byte: rich printed it with its tabs
    expanded to spaces, its carriage returns dropped and `:smile:` turned into an emoji."""
    prompt = "a\tb :smile:\r\nc"
    common = ("--model", str(trained_like), "-n", "6", "--block", "4")
    r = invoke(prompt, *common, "--no-live")
    assert r.exit_code == 0, r.output
    generated = json.loads(invoke(prompt, *common, "--json").stdout)["text"]
    assert r.stdout_bytes.decode() == prompt + generated + "\n"  # (`stdout` turns \r\n into \n)


def test_cli_stats_line_is_one_line_on_a_narrow_stderr(trained_like, monkeypatch):
    """The stats line is one line whatever stderr's width (rich wraps at 80 columns when stderr is a file or a
    pipe: `2> log` split it in two)."""
    import io

    from rich.console import Console

    from twotower_cli import display

    narrow = Console(file=io.StringIO(), width=40)
    monkeypatch.setattr(display, "err_console", lambda: narrow)
    r = invoke("hello", "--model", str(trained_like), "-n", "6", "--block", "4", "--no-live")
    assert r.exit_code == 0, r.output
    lines = narrow.file.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prompt ") and lines[0].rstrip().endswith("MiB"), lines


def test_cli_events_stream(trained_like):
    r = invoke("hello", "--model", str(trained_like), "--block", "4", "-n", "8", "--json", "--events")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    kinds = [x.get("event") for x in lines]
    assert kinds[0] == "block_started" and "step" in kinds and "block_done" in kinds and "finished" in kinds
    assert "text" in lines[-1]  # the result object follows the events


def test_cli_prompt_file_and_stdin(trained_like, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello"}\n{"text": "abc"}\n')
    r = invoke("--prompt-file", str(f), "--model", str(trained_like), "-n", "4", "--block", "4", "--json")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["prompt"] for x in r.stdout.strip().splitlines()] == ["hello", "abc"]
    r = invoke("--model", str(trained_like), "-n", "4", "--block", "4", "--json", input="from stdin")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["prompt"] == "from stdin"


def test_steps_below_one_are_not_said_against_the_block_size(trained_like):
    """`--steps -1` without --block said "must be between 1 and the block size 1": the block is not known
    before the checkpoint is read, and it is not what is wrong. Below 1 it says so; above the block, the
    block size it exceeds."""
    for steps in ("-1", "0"):
        r = invoke("hi", "--model", str(trained_like), "-n", "4", "--steps", steps)
        assert r.exit_code == 1 and r.stderr == f"Error: steps {steps} must be at least 1 (hint: try --steps 8)\n", r.output
    r = invoke("hi", "--model", str(trained_like), "-n", "4", "--steps", "5", "--block", "4")
    assert r.exit_code == 1 and r.stderr.startswith("Error: steps 5 must be between 1 and the block size 4"), r.output


def test_cli_dash_reads_stdin_and_a_byte_order_mark_is_not_text(trained_like, tmp_path):
    """`-` as PROMPT or --prompt-file is stdin (mlx-lm's convention), not the one-character prompt "-"; a
    prompt file saved with a UTF-8 byte-order mark (Windows editors) reads as the same file without it (its
    first JSONL line was taken for a plain prompt: the JSON text itself), from a path and from stdin alike."""
    common = ("--model", str(trained_like), "-n", "4", "--block", "4", "--json")
    lines = '{"prompt": "hello"}\nabc\n'
    plain, bom = tmp_path / "p.jsonl", tmp_path / "bom.jsonl"
    plain.write_text(lines, encoding="utf-8")
    bom.write_text(lines, encoding="utf-8-sig")

    def results(r):
        assert r.exit_code == 0, r.output
        return [(o["prompt"], o["token_ids"]) for o in map(json.loads, r.stdout.splitlines())]

    want = results(invoke("--prompt-file", str(plain), *common))
    assert [p for p, _ in want] == ["hello", "abc"]
    assert results(invoke("--prompt-file", str(bom), *common)) == want
    assert results(invoke("--prompt-file", "-", *common, input=lines)) == want
    assert results(invoke("--prompt-file", "-", *common, input="\ufeff" + lines)) == want  # piped in: the same
    assert results(invoke("-", *common, input="hello\n")) == want[:1]
    assert results(invoke("-", *common, input="\ufeffhello\n")) == want[:1]
    piped = fed_through_a_pipe(tmp_path / "pipe", lines)  # `--prompt-file <(…)`: it said "not a regular file"
    assert results(invoke("--prompt-file", str(piped), *common)) == want
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for r, source in ((invoke("--prompt-file", str(empty), *common), f"prompt file {empty}"),
                      (invoke("--prompt-file", "-", *common, input=""), "stdin")):
        assert r.exit_code == 1 and r.stderr.strip() == (f"Error: {source} holds no prompts (hint: one prompt per "
                                                         "line, or JSONL with a prompt field)"), r.output


def test_cli_prompt_file_in_batches(trained_like, tmp_path):
    """--batch-size: a prompt file runs in batches (results in file order, the tokens of one batch of all:
    padding changes nothing); --events tags each event with its batch."""
    lines = ["hello", "a b", "the quick brown fox", "x", "what now?"]
    f = tmp_path / "p.txt"
    f.write_text("\n".join(lines) + "\n")
    common = ("--prompt-file", str(f), "--model", str(trained_like), "-n", "6", "--block", "4", "--threshold", "0.3",
              "--json")
    whole = [json.loads(x) for x in invoke(*common).stdout.splitlines()]
    r = invoke(*common, "--batch-size", "2", "--events")
    assert r.exit_code == 0, r.output
    objs = [json.loads(x) for x in r.stdout.splitlines()]
    results = [o for o in objs if "event" not in o]
    assert [o["prompt"] for o in results] == lines == [o["prompt"] for o in whole]
    assert [o["token_ids"] for o in results] == [o["token_ids"] for o in whole]
    assert sorted({o["batch"] for o in objs if "event" in o}) == [0, 1, 2]
    assert [len(o["active"]) for o in objs if o.get("event") == "block_started" and o["block"] == 0] == [2, 2, 1]
    # a batch's results come before the next batch's events
    kinds = ["result" if "event" not in o else o["batch"] for o in objs]
    assert kinds.index(1) > kinds.index("result") and kinds[-1] == "result"
    stats = invoke(*common[:-1], "--batch-size", "2", "--no-live").stderr
    assert "continuous batching, ≤ 2 at a time" in stats
    stats = invoke(*common[:-1], "--batch-size", "2", "--json", "--events").stderr
    assert "in 3 batches" in stats


def test_cli_prompt_file_runs_with_continuous_batching(trained_like, backend, tmp_path):
    """Without the live view a prompt file runs with continuous batching: with a stop id that ends sequences
    early, the next prompts take their places; every result, in file order, is the sampler's on its prompt
    alone, and `nfe` is its own."""
    from twotower_cli.text import Tokenizer

    tok = Tokenizer(trained_like)
    lines = ["hello", "a b", "the quick brown fox", "x", "what now?", "more text here", "z z", "ok then"]
    f = tmp_path / "p.txt"
    f.write_text("\n".join(lines) + "\n")
    cfg = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=12)
    free = [S.run(backend, [tok.encode(x)], cfg).generations[0].token_ids for x in lines]
    stop = max(set(free[0]), key=lambda t: sum(t in ids[:8] for ids in free))  # ends several of them early
    eos = sorted(set(json.loads(invoke("hi", "--model", str(trained_like), "-n", "1", "--json").stdout)["settings"]["stop_ids"]))
    r = invoke("--prompt-file", str(f), "--model", str(trained_like), "-n", "12", "--block", "4", "--threshold", "0.3",
               "--stop", str(stop), "--batch-size", "3", "--json")
    assert r.exit_code == 0, r.output
    results = [json.loads(x) for x in r.stdout.splitlines()]
    assert [o["prompt"] for o in results] == lines
    for o in results:
        want = S.run(backend, [tok.encode(o["prompt"])], cfg, eos + [stop]).generations[0]
        assert (o["token_ids"], o["finish_reason"], o["nfe"]) == (want.token_ids, want.finish_reason, want.nfe)
    assert len({len(o["token_ids"]) for o in results}) >= 3  # sequences ended at different steps
    assert "continuous batching, ≤ 3 at a time" in r.stderr



def _with_block_size(src, dst, block_size):
    """A copy of the checkpoint `src` whose config.json records `block_size` (None: no record, as in NVIDIA's
    release)."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw["twotower"].pop("block_size")
    if block_size is not None:
        raw["twotower"]["block_size"] = block_size
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize(("recorded", "block"), [(4, 4), (8, 8), (None, 16)])
def test_cli_block_defaults_to_the_block_the_denoiser_was_trained_with(trained_like, tmp_path, recorded, block):
    folder = _with_block_size(trained_like, tmp_path / "ck", recorded)
    r = invoke("hello", "--model", str(folder), "-n", "20", "--threshold", "0.3", "--json", "--events")
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines[-1]["settings"]["block_size"] == block and lines[-1]["settings"]["steps"] == block
    starts = [x["size"] for x in lines if x.get("event") == "block_started"]
    assert starts == [block] * (20 // block) + ([20 % block] if 20 % block else [])
    # --steps is checked against the checkpoint's block, once it is known
    r = invoke("hello", "--model", str(folder), "--steps", str(block + 1))
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: steps {block + 1} must be between 1 and the block "
                                                    f"size {block}"), r.output


@pytest.mark.parametrize("mode", ["ar", "mock_ar"])
def test_cli_ar_modes_are_not_refused_over_steps_and_block_they_do_not_use(trained_like, mode):
    """ar and mock_ar decode token by token: --steps beyond the checkpoint's block (4), or beyond --block, does
    not stop them (it was 'Error: steps 9 must be between 1 and the block size 4') and changes nothing; a
    --steps that is no number of steps at all is still an error, as --threshold 2 is in these modes."""
    common = ("hello", "--model", str(trained_like), "--mode", mode, "-n", "6", "--no-live")
    want = invoke(*common)
    assert want.exit_code == 0, want.output
    for extra in (("--steps", "9"), ("--block", "2", "--steps", "3")):
        r = invoke(*common, *extra)
        assert r.exit_code == 0 and r.stdout == want.stdout, (extra, r.output)
    r = invoke(*common, "--steps", "0")
    assert r.exit_code == 1 and r.stderr.strip() == (
        f"Error: steps 0 must be at least 1 (hint: {mode} does not use it: leave it out)"), r.output
    r = invoke(*common, "--threshold", "2")
    assert r.exit_code == 1 and r.stderr.startswith("Error: threshold 2.0 must be in (0, 1]"), r.output


def test_cli_warns_when_prompt_and_new_tokens_pass_the_stated_context(trained_like, tmp_path):
    """A checkpoint states max_position_embeddings (serve's --max-model-len refuses past it); generate went past
    it silently. It still samples (attention has no positions), with one Warning line naming what fits."""
    short = tmp_path / "short"
    shutil.copytree(trained_like, short)
    raw = json.loads((short / "config.json").read_text())
    raw["max_position_embeddings"] = 12
    (short / "config.json").write_text(json.dumps(raw))
    r = invoke("hello", "--model", str(short), "-n", "16", "--json")
    prompt_tokens = json.loads(r.stdout)["prompt_tokens"]
    assert r.exit_code == 0 and len(json.loads(r.stdout)["token_ids"]) == 16, r.output
    assert [ln for ln in r.stderr.splitlines() if "Warning" in ln] == [
        f"Warning: prompt and --max-new-tokens reach {prompt_tokens + 16} tokens, beyond the 12 this checkpoint is "
        "meant for (max_position_embeddings); longer sequences run, but the model was not trained on them "
        f"(hint: use --max-new-tokens {12 - prompt_tokens})"]
    r = invoke("hello", "--model", str(short), "-n", str(12 - prompt_tokens), "--json")
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output
    r = invoke("hello", "--model", str(trained_like), "-n", "16", "--json")  # states none: nothing to say
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output


def test_cli_block_larger_than_trained_warns_once_and_samples(trained_like, tmp_path):
    r = invoke("hello", "--model", str(trained_like), "--block", "8", "-n", "8", "--json")
    assert r.exit_code == 0, r.output
    assert [ln for ln in r.stderr.splitlines() if "Warning" in ln] == [
        "Warning: block 8 is larger than the block this denoiser was trained with (4, config.json); larger blocks "
        "give much worse text (hint: leave out --block to use 4)"]
    assert json.loads(r.stdout)["settings"]["block_size"] == 8
    for args in (("--block", "4"), ("--block", "2"), ("--block", "8", "--mode", "ar"),
                 ("--block", "8", "--mode", "mock_ar")):
        r = invoke("hello", "--model", str(trained_like), "-n", "4", "--json", *args)
        assert r.exit_code == 0 and "larger than" not in r.stderr, (args, r.output)
        # ar and mock_ar: only that --block changes nothing (test_cli_options_the_mode_does_not_read_warn_once_each)
        assert ("Warning" in r.stderr) == ("--mode" in args), (args, r.output)
    nvidia = _with_block_size(trained_like, tmp_path / "nv", None)
    r = invoke("hello", "--model", str(nvidia), "--block", "32", "-n", "4", "--json")
    assert r.exit_code == 0 and "trained with (16, NVIDIA's release)" in r.stderr, r.output

BAD = [
    (["", ], "empty prompt"),
    (["hi", "--block", "0"], "block size"),
    (["hi", "--steps", "0"], "steps"),
    (["hi", "--block", "4", "--steps", "5"], "steps"),
    (["hi", "--threshold", "0"], "threshold"),
    (["hi", "--threshold", "1.2"], "threshold"),
    (["hi", "-n", "0"], "max-new-tokens 0 must be at least 1 (hint: try 128)"),  # generate's default
    (["hi", "--mask-token-id", "4000"], "outside the vocabulary"),
    (["hi", "--stop", "4000"], "stop id [4000] is outside the vocabulary"),
    (["hi", "--stop", "-1"], "stop id [-1]"),
    (["--prompt-file", "/dev/null"], "prompt file /dev/null holds no prompts"),  # read as a pipe is
    (["hi", "--batch-size", "0"], "batch size 0"),
    (["hi", "--mode", "nope"], "mode"),
    (["hi", "--temperature", "inf"], "temperature inf must be a finite number"),  # it sampled <unk> every token
    (["hi", "--seed", str(2**70)], f"--seed {2**70} is out of range"),  # "ValueError: Overflow ... looks like a bug"
    (["hi", "--seed", "-5"], "--seed -5 is out of range (hint: use a seed from 0 to 2**64 - 1)"),  # was taken
    (["hi", "--threads", str(2**40)], "more than torch can take"),  # the same
]


@pytest.mark.parametrize(("args", "needle"), BAD)
def test_cli_bad_input_one_error_line(trained_like, args, needle):
    r = invoke(*args, "--model", str(trained_like))
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("Error:") and needle in err[0], r.stderr
    assert "Traceback" not in r.output


@pytest.mark.parametrize("option", ["--stop", "--mask-token-id"])
def test_cli_negative_token_id_names_no_vocabulary_it_does_not_have(trained_like, option):
    """A negative id is refused before the load, when the vocabulary is not known yet: the message must not
    name a range of ids the model does not have (it named 0..4611686018427387903)."""
    import re

    vocab = json.loads((trained_like / "config.json").read_text())["vocab_size"]
    r = invoke("hi", option, "-1", "--model", str(trained_like))
    assert r.exit_code == 1 and r.stderr.startswith("Error:") and "-1" in r.stderr, r.output
    assert all(int(n) <= vocab for n in re.findall(r"\d+", r.stderr)), r.stderr


@pytest.mark.parametrize("options", [["--top-k", "2"], ["--top-p", "0.5"], ["--top-k", "2", "--top-p", "0.5"]])
def test_cli_top_k_top_p_while_greedy_warn_that_they_change_nothing(trained_like, options):
    """--top-k / --top-p without --temperature: the greedy text, and one Warning line saying so (they were
    ignored in silence); with a temperature, no warning."""
    common = ("hello", "--model", str(trained_like), "-n", "6", "--block", "4", "--no-live")
    greedy = invoke(*common)
    r = invoke(*common, *options)
    assert r.exit_code == 0 and r.stdout == greedy.stdout, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    assert len(warnings) == 1 and all(o in warnings[0] for o in options[::2]) and "temperature" in warnings[0]
    sampled = invoke(*common, *options, "--temperature", "0.7")
    assert sampled.exit_code == 0 and "Warning" not in sampled.stderr, sampled.output


def test_cli_text_that_is_not_utf8_is_one_error_line(trained_like, tmp_path):
    """Bytes that are not UTF-8 in a prompt file, on stdin or in the argument (Python reads those as lone
    surrogates) are one Error line naming where they came from (they were a UnicodeDecodeError or the
    tokenizer's "TypeError: TextInputSequence must be str", "this looks like a bug")."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ROMEO \xff.\n")
    runs = [(invoke("--prompt-file", str(bad), "--model", str(trained_like)), f"prompt file {bad} is not UTF-8"),
            (invoke("--model", str(trained_like), input=b"ROMEO \xff."), "stdin is not UTF-8"),
            (invoke("ROMEO \udcff.", "--model", str(trained_like)), "the prompt is not UTF-8")]
    for r, needle in runs:
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(err) == 1 and err[0].startswith("Error: " + needle), r.output


@pytest.mark.parametrize(("line", "needle"), [
    ('{"prompt": "a\\ud800b"}', "p.jsonl:2 holds a lone UTF-16 surrogate escape (\\ud800, at character 1), which "
                                  "is no text"),  # "TypeError: TextInputSequence must be str", "looks like a bug"
    ('{"prompt": ""}', "p.jsonl:2 holds an empty prompt"),  # "empty prompt", not where
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "p.jsonl:2 is not valid JSON: nested too deep"),
    ('{"prompt": "[[[ \\ud83d\\ude00"}', ""),  # a whole pair is text (an emoji)
])
def test_a_jsonl_prompt_that_is_no_text_names_its_line(trained_like, tmp_path, line, needle):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ROMEO."}\n' + line + "\n")
    r = invoke("--prompt-file", str(path), "--model", str(trained_like), "-n", "2", "--json")
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if needle:
        assert r.exit_code == 1 and len(err) == 1 and err[0].startswith(f"Error: {path.parent / needle}"), r.output
    else:
        assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2, r.output


def test_cli_text_options_that_are_not_utf8_are_named(trained_like):
    """--system, --stop-text and --chat-arg with bytes that are not UTF-8 (argv's lone surrogates) reached the
    tokenizer or the template and were its TypeError, "this looks like a bug"; or a stop text that never
    matches. Each is one Error line naming the option."""
    for option, value in (("--system", "\udcff"), ("--stop-text", "x\udcff"), ("--chat-arg", "k=\udcff")):
        r = invoke("hi", option, value, "--model", str(trained_like), "-n", "2")
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(err) == 1, r.output
        assert err[0].startswith(f"Error: Invalid value for '{option}': not UTF-8 text"), err


def test_cli_not_twotower_for_diffusion(tmp_path):
    folder = write_base(tmp_path / "base", random_base(tiny_cfg(), 1))
    for mode in ("mask_diffusion", "mock_ar"):
        r = invoke("hi", "--model", str(folder), "--mode", mode)
        assert r.exit_code == 1 and r.stderr.startswith("Error:") and "not a TwoTower" in r.stderr
    r = invoke("hi", "--model", str(folder), "--mode", "ar", "-n", "3")
    assert r.exit_code == 0, r.output


def test_cli_broken_checkpoints(trained_like, tmp_path):
    missing = invoke("hi", "--model", str(tmp_path / "nowhere"))
    assert missing.exit_code == 1 and missing.stderr.startswith("Error:")
    trunc = tmp_path / "trunc"
    shutil.copytree(trained_like, trunc)
    shard = next(trunc.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    r = invoke("hi", "--model", str(trunc))
    assert r.exit_code == 1 and r.stderr.startswith("Error:"), r.output
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(trained_like, bad_cfg)
    (bad_cfg / "config.json").write_text("{not json")
    r = invoke("hi", "--model", str(bad_cfg))
    assert r.exit_code == 1 and r.stderr.startswith("Error:"), r.output
    no_tok = tmp_path / "notok"
    shutil.copytree(trained_like, no_tok)
    (no_tok / "tokenizer.json").unlink()
    r = invoke("hi", "--model", str(no_tok))
    assert r.exit_code == 1 and "tokenizer" in r.stderr, r.output


def test_cli_stops_on_generation_config_eos(trained_like, tmp_path):
    """generation_config.json's eos_token_id ends a sequence too (as in transformers' generate: a chat model
    lists its end-of-turn token there); config.json's eos still does. Reference: the free run, cut at the
    first occurrence of the token made an end token."""
    args = ("hello", "--block", "4", "-n", "16", "--threshold", "0.5", "--json")
    free = json.loads(invoke(*args, "--model", str(trained_like)).stdout)["token_ids"]
    stop = free[5]
    folder = tmp_path / "gen"
    shutil.copytree(trained_like, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop], "bos_token_id": 1}))
    r = invoke(*args, "--model", str(folder))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["token_ids"] == free[:free.index(stop)] and out["finish_reason"] == "eos"
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))  # one id, not a list
    assert json.loads(invoke(*args, "--model", str(folder)).stdout)["token_ids"] == free[:free.index(stop)]
    for bad in ("{not json", '{"eos_token_id": "eleven"}', "[2, 11]"):
        (folder / "generation_config.json").write_text(bad)
        r = invoke(*args, "--model", str(folder))
        assert r.exit_code == 1 and r.stderr.startswith("Error:") and "generation_config.json" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- --chat

CONVERSATIONS = [
    ([{"role": "user", "content": " hello there \n"}], {}),
    ([{"role": "system", "content": "be brief."}, {"role": "user", "content": "who are you?"}],
     {"enable_thinking": False}),
    ([{"role": "user", "content": "hi"}], {"tools": [{"name": "é<&"}], "enable_thinking": True}),
]


@pytest.mark.hf
@pytest.mark.parametrize("where", ["jinja", "config", "named"])
def test_chat_template_renders_and_encodes_as_transformers(trained_like, tmp_path, where):
    """ChatTemplate.render + encode(add_special_tokens=False) == transformers' apply_chat_template
    (add_generation_prompt=True), text and ids, for each place a template can live."""
    transformers = pytest.importorskip("transformers")
    from twotower_cli.text import ChatTemplate, Tokenizer

    folder = add_chat(shutil.copytree(trained_like, tmp_path / "chat"), where)
    ours, tok = ChatTemplate.load(folder), Tokenizer(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for messages, variables in CONVERSATIONS:
        text = ours.render(messages, **variables)
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **variables)
        assert text == want
        want_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                          **variables)
        assert tok.encode(text, add_special_tokens=False) == list(want_ids)
    assert tok.encode("<s><|im_start|>assistant", False) == [1, 37, *tok.encode("assistant", False)]
    assert (where == "named") == ours.render(CONVERSATIONS[2][0], **CONVERSATIONS[2][1]).startswith("<s>tools [{\"name\": \"é<&\"}]|hi")


def test_cli_chat_generates_from_the_rendered_conversation(trained_like, tmp_path):
    """--chat: the model reads the rendered conversation's ids (reference: the sampler run on those ids),
    stops on generation_config's <|im_end|>, and prints the reply alone."""
    from twotower_cli.text import ChatTemplate, Tokenizer

    folder = add_chat(shutil.copytree(trained_like, tmp_path / "chat"))
    args = ("who are you?", "--model", str(folder), "--chat", "--system", "be brief.", "--chat-arg",
            "enable_thinking=false", "--block", "4", "-n", "12", "--threshold", "0.5")
    out = json.loads(invoke(*args, "--json").stdout)
    rendered = ChatTemplate.load(folder).render(
        [{"role": "system", "content": "be brief."}, {"role": "user", "content": "who are you?"}],
        enable_thinking=False)
    assert out["prompt"] == "who are you?" and out["chat_prompt"] == rendered
    assert rendered.endswith("<|im_start|>assistant\n<think></think>")
    ids = Tokenizer(folder).encode(rendered, add_special_tokens=False)
    backend = TowerBackend(load_model(folder, need_denoiser=True).twotower)
    want = S.run(backend, [ids], S.SamplingConfig(block_size=4, threshold=0.5, max_new_tokens=12),
                 eos_ids=[2, 38]).generations[0]
    assert out["token_ids"] == want.token_ids and out["finish_reason"] == want.finish_reason
    plain = invoke(*args, "--no-live")
    assert plain.exit_code == 0 and plain.stdout == out["text"] + "\n"


@pytest.mark.parametrize("setup, args, needle", [
    (None, ("--chat",), "no chat template"),
    (None, ("--system", "x"), "add --chat"),
    (None, ("--chat-arg", "a=1"), "add --chat"),
    ("jinja", ("--chat", "--chat-arg", "no-equals"), "KEY=VALUE"),
    ("broken", ("--chat",), "cannot read the chat template"),
    ("jinja", ("--chat", "--system", "s", "--chat-arg", "x=1"), None),
])
def test_cli_chat_errors(trained_like, tmp_path, setup, args, needle):
    folder = shutil.copytree(trained_like, tmp_path / "chat")
    if setup:
        add_chat(folder)
    if setup == "broken":
        (folder / "chat_template.jinja").write_text("{% for m in messages %}")
    r = invoke("hi", "--model", str(folder), "-n", "2", "--block", "4", "--no-live", *args)
    if needle is None:
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 1 and r.stderr.startswith("Error:") and needle in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_chat_template_raise_exception_is_one_error_line(trained_like, tmp_path):
    folder = add_chat(shutil.copytree(trained_like, tmp_path / "chat"))
    (folder / "chat_template.jinja").write_text("{{ raise_exception('only user turns, please') }}")
    r = invoke("hi", "--model", str(folder), "--chat", "--no-live")
    assert r.exit_code == 1 and "only user turns, please" in r.stderr and r.stderr.startswith("Error:"), r.output


def test_cli_chat_prompt_file_with_conversations(trained_like, tmp_path):
    """--chat --prompt-file: plain lines and prompt/text objects become user messages, a `messages` line is
    a whole conversation; each is rendered by the template, and a batch gives each conversation what it
    gives alone. Without --chat a conversation line is one Error line."""
    from twotower_cli.text import ChatTemplate

    folder = add_chat(shutil.copytree(trained_like, tmp_path / "chat"))
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."},
            {"role": "user", "content": "and now?"}]
    f = tmp_path / "p.jsonl"
    f.write_text("plain line\n" + json.dumps({"prompt": "from json"}) + "\n" + json.dumps({"messages": talk}) + "\n")
    common = ("--model", str(folder), "--block", "4", "-n", "8", "--json", "--chat")
    r = invoke("--prompt-file", str(f), *common)
    assert r.exit_code == 0, r.output
    outs = [json.loads(line) for line in r.stdout.splitlines()]
    template = ChatTemplate.load(folder)
    conversations = [[{"role": "user", "content": "plain line"}], [{"role": "user", "content": "from json"}], talk]
    assert [o["chat_prompt"] for o in outs] == [template.render(c) for c in conversations]
    assert [o["prompt"] for o in outs] == ["plain line", "from json", talk]
    alone = tmp_path / "one.jsonl"
    alone.write_text(json.dumps({"messages": talk}) + "\n")
    assert json.loads(invoke("--prompt-file", str(alone), *common).stdout)["token_ids"] == outs[2]["token_ids"]
    r = invoke("--prompt-file", str(f), "--model", str(folder), "--no-live")
    assert r.exit_code == 1 and r.stderr.startswith("Error:") and "--chat" in r.stderr, r.output
    alone.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    r = invoke("--prompt-file", str(alone), *common)
    assert r.exit_code == 1 and "'messages' must be" in r.stderr, r.output


def test_cli_prompt_file_progress_on_a_terminal_leaves_the_results_on_stdout(trained_like, tmp_path, monkeypatch):
    """--json to a file with a terminal on stderr: a progress bar there (prompts done, tok/s), every result
    still a JSON line on stdout."""
    import io

    from rich.console import Console

    from twotower_cli import display

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=100)
    monkeypatch.setattr(display, "err_console", lambda: terminal)
    f = tmp_path / "p.txt"
    f.write_text("hello\nabc\nthe quick brown fox\n")
    r = invoke("--prompt-file", str(f), "--model", str(trained_like), "-n", "6", "--block", "4", "--json",
               "--batch-size", "2")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["prompt"] for x in r.stdout.splitlines()] == ["hello", "abc", "the quick brown fox"]
    assert "generate" in screen.getvalue() and "3/3" in screen.getvalue() and "tok/s" in screen.getvalue()


@pytest.mark.slow
def test_cli_output_to_a_reader_that_left_ends_quietly(trained_like):
    """`twotower generate ... | head -1`: when the reader closes the pipe, the command stops without an
    `Error: Broken pipe` line (as click and rich end on a broken pipe: exit code 1, nothing said)."""
    import subprocess
    import sys

    # far more than a pipe buffer of events, so a write after the reader left is certain
    args = [sys.executable, "-m", "twotower_cli", "generate", "hello", "--model", str(trained_like), "--mode", "ar",
            "-n", "1000", "--json", "--events"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(p.stdout.readline())["event"] == "block_started"
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1
    assert "Error" not in err and "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize(("mode", "at", "signal"), [("mask_diffusion", "extend", "int"), ("mask_diffusion", "denoise", "term"),
                                              ("ar", "extend", "int")])
def test_cli_ctrl_c_with_continuous_batching_prints_the_prompts_under_way(trained_like, tmp_path, monkeypatch,
                                                                          mode, at, signal):
    """Several prompts without the live view run with continuous batching. Ctrl-C (or SIGTERM: cli.Terminated)
    after two blocks (ar: tokens), as they go into the context or in the third block's first denoiser step:
    each prompt under way prints its text so far, in file order, as a run of that length prints it, then
    `Error: interrupted` and exit code 1, as one prompt does (their text was lost); with --json each is a
    record with finish_reason "interrupted". The fourth prompt, which has not started (--batch-size 3), is not
    printed."""
    from twotower_cli.cli import Terminated

    prompts = ["hello", "abc", "the quick", "brown fox"]
    f, first3 = tmp_path / "p.txt", tmp_path / "first3.txt"
    f.write_text("\n".join(prompts) + "\n")
    first3.write_text("\n".join(prompts[:3]) + "\n")
    block = ("--block", "4") if mode == "mask_diffusion" else ()  # ar reads no --block (it would warn)
    common = ("--model", str(trained_like), *block, "--mode", mode, "--batch-size", "3")
    n = 8 if mode == "mask_diffusion" else 2
    want = invoke("--prompt-file", str(first3), *common, "-n", str(n), "--no-live")
    want_json = invoke("--prompt-file", str(first3), *common, "-n", str(n), "--json")
    assert want.exit_code == 0 and want_json.exit_code == 0, want.output + want_json.output
    records = [json.loads(line) for line in want_json.stdout.splitlines()]
    # each went on after the n tokens it shows: ended by its length, not by an end id
    assert [x["finish_reason"] for x in records] == ["length"] * 3, records
    real_extend, real_denoise, extends = TowerBackend.extend, TowerBackend.denoise, []
    stop = Terminated if signal == "term" else KeyboardInterrupt

    def extend(self, *args, **kwargs):  # the prompts, then one feed per committed block (ar: token)
        extends.append(1)
        if at == "extend" and len(extends) == 3:
            raise stop
        return real_extend(self, *args, **kwargs)

    def denoise(self, *args, **kwargs):
        if at == "denoise" and len(extends) == 3:
            raise stop
        return real_denoise(self, *args, **kwargs)

    monkeypatch.setattr(TowerBackend, "extend", extend)
    monkeypatch.setattr(TowerBackend, "denoise", denoise)
    r = invoke("--prompt-file", str(f), *common, "-n", "40", "--no-live")
    assert r.exit_code == 1 and r.stderr.strip() == "Error: interrupted", r.output
    assert r.stdout == want.stdout
    extends.clear()
    r = invoke("--prompt-file", str(f), *common, "-n", "40", "--json")
    assert r.exit_code == 1 and r.stderr.strip() == "Error: interrupted", r.output
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["prompt"], x["text"], x["token_ids"], x["finish_reason"]) for x in got] == [
        (x["prompt"], x["text"], x["token_ids"], "interrupted") for x in records]
    assert all(x["settings"]["max_new_tokens"] == 40 and x["mode"] == mode and x["nfe"] >= 1 for x in got)


def test_cli_live_view_on_a_terminal_prints_the_prompts_it_does_not_draw(trained_like, tmp_path, monkeypatch):
    """Six prompts, live on a terminal: the view draws four and counts the others ("+2 more prompts"); those
    two are printed, as --no-live prints them, instead of shown nowhere."""
    import io

    from rich.console import Console

    from twotower_cli import display

    prompts = ["hello", "abc", "the quick", "brown fox", "jumps over", "the lazy dog"]
    f, rest = tmp_path / "p.txt", tmp_path / "rest.txt"
    f.write_text("\n".join(prompts) + "\n")
    rest.write_text("\n".join(prompts[4:]) + "\n")
    common = ("--model", str(trained_like), "-n", "6", "--block", "4")
    want = invoke("--prompt-file", str(rest), *common, "--no-live")
    assert want.exit_code == 0, want.output
    screen = Console(file=io.StringIO(), force_terminal=True, width=200)
    monkeypatch.setattr(display, "err_console", lambda: screen)
    monkeypatch.setattr(display, "stdout_is_terminal", lambda: True)
    r = invoke("--prompt-file", str(f), *common)
    assert r.exit_code == 0, r.output
    assert "(+2 more prompts)" in screen.file.getvalue()
    assert r.stdout == want.stdout


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_cli_ctrl_c_without_the_live_view_prints_the_text_so_far(trained_like, monkeypatch, mode):
    """Ctrl-C after two blocks (ar: tokens) with --no-live: the text of those blocks, as a run of that length
    prints it, then `Error: interrupted` and exit code 1 (it printed nothing: the text was lost)."""
    from twotower_cli.towers import TowerBackend

    block = ("--block", "4") if mode == "mask_diffusion" else ()  # ar reads no --block (it would warn)
    common = ("hello", "--model", str(trained_like), *block, "--no-live", "--mode", mode)
    n = 8 if mode == "mask_diffusion" else 2
    want = invoke(*common, "-n", str(n))
    assert want.exit_code == 0, want.output
    real, calls = TowerBackend.extend, []

    def interrupted(self, *args, **kwargs):  # the prompt, then one extend per committed block (ar: token)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TowerBackend, "extend", interrupted)
    r = invoke(*common, "-n", "40")
    assert r.exit_code == 1 and r.stderr.strip() == "Error: interrupted", r.output
    assert r.stdout == want.stdout
    # --json: the record so far, as a run of that length gives it, with finish_reason "interrupted"
    monkeypatch.setattr(TowerBackend, "extend", real)
    whole = invoke(*common, "-n", str(n), "--json")
    assert whole.exit_code == 0, whole.output
    monkeypatch.setattr(TowerBackend, "extend", interrupted)
    calls.clear()
    cut = invoke(*common, "-n", "40", "--json")
    assert cut.exit_code == 1 and cut.stderr.strip() == "Error: interrupted", cut.output
    (got,), (full,) = ([json.loads(line) for line in x.stdout.splitlines()] for x in (cut, whole))
    assert full["finish_reason"] == "length" and got["finish_reason"] == "interrupted"
    assert {k: got[k] for k in ("prompt", "text", "token_ids", "nfe")} == \
        {k: full[k] for k in ("prompt", "text", "token_ids", "nfe")}
    assert got["settings"] == {**full["settings"], "max_new_tokens": 40}
    # the live view on a terminal, the text going to a file: the file gets it too
    import io

    from rich.console import Console

    from twotower_cli import display

    calls.clear()
    monkeypatch.setattr(display, "err_console", lambda: Console(file=io.StringIO(), force_terminal=True, width=100))
    r = invoke(*[a for a in common if a != "--no-live"], "-n", "40")
    assert r.exit_code == 1 and r.stdout == want.stdout, r.output


def _without_shard(sharded, dst, prefix):
    """A copy of the sharded checkpoint without the shard holding the first tensor named `prefix`*."""
    from twotower_cli.checkpoint import open_checkpoint

    shard = next(i.file for n, i in sorted(open_checkpoint(sharded).tensors.items()) if n.startswith(prefix))
    shutil.copytree(sharded, dst)
    (dst / shard).unlink()
    return dst, shard


@pytest.fixture(scope="module")
def sharded(trained_like, tmp_path_factory):
    return reshard(trained_like, tmp_path_factory.mktemp("sharded") / "tt")


@pytest.mark.parametrize("prefix", ["context_tower.", "denoiser_tower."])
@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_cli_missing_shard_is_named(sharded, trained_like, tmp_path, prefix, mode):
    """A shard the index names but the folder lacks is one Error line naming it, with a hint to fetch or write it
    again (it was "15 tensor(s) missing ... is the config.json the one these weights were saved with?", or, for
    a lost denoiser shard, "not a TwoTower checkpoint"); the whole sharded copy samples what the original does."""
    common = ("hello", "--mode", mode, "-n", "6", "--no-live")
    whole = invoke(*common, "--model", str(sharded))
    assert whole.exit_code == 0 and whole.stdout == invoke(*common, "--model", str(trained_like)).stdout, whole.output
    folder, shard = _without_shard(sharded, tmp_path / "ck", prefix)
    r = invoke(*common, "--model", str(folder))
    assert r.exit_code == 1 and r.stderr.strip() == (
        f"Error: checkpoint at {folder} is incomplete: shard {shard} named in the index is missing (hint: "
        "re-download the checkpoint, or re-run the `twotower split` that wrote it)"), r.output


UNUSED = [  # options given that the mode or policy never reads → the flags its Warning lines name
    (("--mode", "ar", "--block", "32"), ["--block"]),
    (("--mode", "ar", "--threshold", "0.5"), ["--threshold"]),
    (("--mode", "mock_ar", "--steps", "2", "--policy", "topk", "--factor", "2"), ["--steps", "--policy", "--factor"]),
    (("--policy", "topk", "--threshold", "0.5"), ["--threshold"]),
    (("--policy", "factor", "--threshold", "0.5"), ["--threshold"]),
    (("--policy", "threshold", "--factor", "2"), ["--factor"]),
    (("--threshold", "0.8", "--block", "4", "--steps", "2"), []),  # all read by mask_diffusion's threshold policy
    (("--policy", "factor", "--factor", "2"), []),
    (("--mode", "ar",), []),  # defaults are never warned about
]


@pytest.mark.parametrize(("args", "flags"), UNUSED)
def test_cli_options_the_mode_does_not_read_warn_once_each(trained_like, args, flags):
    """--block/--steps/--threshold/--policy/--factor outside mask_diffusion, and --threshold or --factor under a
    policy that does not read it, were ignored in silence: one Warning line each (for options given, never for
    defaults), and the same text as without them."""
    common = ("hello", "--model", str(trained_like), "-n", "6", "--no-live")
    r = invoke(*common, *args)
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    assert [w.split(":")[1].strip() for w in warnings] == flags, r.stderr
    assert all("no effect" in w for w in warnings), warnings
    if flags and "--mode" in args:  # unused options change nothing
        mode = args[args.index("--mode") + 1]
        assert r.stdout == invoke(*common, "--mode", mode).stdout
