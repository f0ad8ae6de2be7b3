"""The Python API (`twotower_cli.load`, `Runtime.generate`) against the `generate` command, the reference
for what the same settings give: the same text, ids, finish reason and forwards, one prompt and several;
and the tour in examples/ runs as written."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.twotower_helpers import stop_inside, write_random_twotower
from typer.testing import CliRunner

import twotower_cli
from twotower_cli.cli import get_app
from twotower_cli.errors import TwoTowerError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_twotower(tmp_path_factory.mktemp("api") / "tt")


@pytest.fixture(scope="module")
def rt(folder):
    return twotower_cli.load(str(folder), device="cpu")


def cli(*args, input=None) -> list[dict]:
    r = CliRunner().invoke(get_app(), ["generate", *args, "--json"], input=input)
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines()]


def same(completion, record) -> None:
    assert (completion.text, completion.token_ids, completion.finish_reason, completion.nfe,
            completion.prompt_tokens) == (record["text"], record["token_ids"], record["finish_reason"], record["nfe"],
                                          record["prompt_tokens"])


@pytest.mark.parametrize(("options", "kwargs"), [
    ((), {}),
    (("--mode", "ar"), {"mode": "ar"}),
    (("--mode", "mock_ar"), {"mode": "mock_ar"}),
    (("--block", "4", "--steps", "2", "--threshold", "0.3"), {"block": 4, "steps": 2, "threshold": 0.3}),
    (("--temperature", "0.9", "--top-k", "8", "--seed", "7"), {"temperature": 0.9, "top_k": 8, "seed": 7}),
    (("--policy", "factor", "--factor", "2", "--stop", "9"), {"policy": "factor", "factor": 2.0, "stop": (9,)}),
])
def test_generate_one_prompt_is_what_the_command_gives(rt, folder, options, kwargs):
    record, = cli("hello there", "--model", str(folder), "-n", "20", *options)
    same(rt.generate("hello there", max_new_tokens=20, **kwargs), record)


def test_generate_several_prompts_are_what_the_command_gives_with_a_stop_text(rt, folder, tmp_path):
    prompts = ["hello there", "the quick brown fox", "and what now?"]
    f = tmp_path / "p.txt"
    f.write_text("\n".join(prompts) + "\n")
    free = cli("--prompt-file", str(f), "--model", str(folder), "-n", "24", "--block", "4", "--batch-size", "2")
    text = free[1]["text"]
    stop = stop_inside(text)
    records = cli("--prompt-file", str(f), "--model", str(folder), "-n", "24", "--block", "4", "--batch-size", "2",
                  "--stop-text", stop)
    got = rt.generate(prompts, max_new_tokens=24, block=4, batch_size=2, stop_texts=(stop,))
    assert isinstance(got, list) and len(got) == 3
    for completion, record in zip(got, records, strict=True):
        same(completion, record)
    assert got[1].finish_reason == "stop" and got[1].text == text[:text.find(stop)]


def test_bad_settings_raise_the_commands_errors(rt, folder):
    for kwargs, needle in [({"threshold": 2.0}, "threshold"), ({"block": 0}, "block size"),
                           ({"steps": 99, "block": 4}, "steps"), ({"mode": "fast"}, "mode"),
                           ({"stop_texts": ("",)}, "--stop-text ''"), ({"batch_size": 0}, "batch size"),
                           ({"seed": 2**64}, "seed")]:
        with pytest.raises(TwoTowerError, match=needle):
            rt.generate("hi", max_new_tokens=4, **kwargs)
    with pytest.raises(TwoTowerError, match="encodes to no tokens"):
        rt.generate(["hi", ""], max_new_tokens=4)
    ar_only = twotower_cli.load(str(folder), device="cpu", denoiser=False)
    assert ar_only.generate("hi", mode="ar", max_new_tokens=4).token_ids == rt.generate(
        "hi", mode="ar", max_new_tokens=4).token_ids
    with pytest.raises(TwoTowerError, match="denoiser"):
        ar_only.generate("hi", max_new_tokens=4)


def test_a_runtime_shows_itself_in_one_line(rt, folder):
    """In a notebook `rt` prints what was loaded, not the modules of both towers (9 kB)."""
    shown = repr(rt)
    assert shown == (f"Runtime(tt: 8 layers {rt.cfg.pattern!r}, vocabulary 48, block {rt.cfg.block_size}, "
                     "context tower + denoiser, cpu float32)")
    assert "context tower only" in repr(twotower_cli.load(str(folder), device="cpu", denoiser=False))


def test_importing_the_package_does_not_import_torch():
    """`import twotower_cli` (and so the CLI's start) stays light: `load` imports torch when called."""
    code = "import sys, twotower_cli; print('torch' in sys.modules, callable(twotower_cli.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


@pytest.mark.slow
def test_the_tour_runs_on_the_embedded_model():
    """examples/tour.py as a user runs it: every step prints, and step 2's texts are the command's."""
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "tour.py")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln[:2] for ln in lines if ln[:1].isdigit()] == ["1.", "2.", "3.", "4.", "5.", "6."]
    ar = next(ln for ln in lines if ln.strip().startswith("ar:"))
    record, = cli("ROMEO.\n", "-n", "48", "--mode", "ar")
    assert repr(record["text"][:60]) in ar
    assert sum("(stop)" in ln or "(length)" in ln or "(eos)" in ln for ln in lines) == 4
    pieces = [ast.literal_eval(ln.split(": ", 1)[1]) for ln in lines if ln.strip().startswith("piece ")]
    assert len(pieces) > 1 and "".join(pieces) == cli("ROMEO.\n", "-n", "48")[0]["text"]


def test_generate_chat_is_what_generate_chat_gives(folder, tmp_path):
    """chat=True renders as `generate --chat`: a string is a user message, a list of messages one
    conversation, system and template_args as --system and --chat-arg; without chat they are refused."""
    import shutil

    from tests.twotower_helpers import add_chat

    chat_folder = add_chat(shutil.copytree(folder, tmp_path / "chat"))
    rt = twotower_cli.load(str(chat_folder), device="cpu")
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "so?"}]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "hello there"}) + "\n" + json.dumps({"messages": talk}) + "\n")
    common = ("--model", str(chat_folder), "-n", "12", "--block", "4", "--chat", "--system", "be brief.",
              "--chat-arg", "enable_thinking=false")
    records = cli("--prompt-file", str(f), *common)
    kw = {"chat": True, "system": "be brief.", "template_args": {"enable_thinking": False}, "max_new_tokens": 12,
          "block": 4}
    for completion, record in zip(rt.generate(["hello there", talk], **kw), records, strict=True):
        same(completion, record)
    same(rt.generate(talk, **kw), records[1])  # one conversation is one prompt
    one, = cli("hello there", *common)
    same(rt.generate("hello there", **kw), one)
    with pytest.raises(TwoTowerError, match="pass chat=True"):
        rt.generate("hi", system="x")
    with pytest.raises(TwoTowerError, match="needs chat=True"):
        rt.generate(talk)


@pytest.mark.parametrize(("kwargs", "stream_of"), [
    ({}, "blocks"), ({"mode": "ar"}, "tokens"), ({"mode": "mock_ar"}, "tokens"),
    ({"block": 4, "threshold": 0.3}, "blocks"), ({"block": 4, "temperature": 0.8, "seed": 3}, "blocks"),
])
def test_stream_pieces_add_up_to_the_text_generate_gives(rt, kwargs, stream_of):
    """`stream` yields the text as blocks (ar, mock_ar: tokens) commit it; joined, generate's text, also
    with a stop text written in the middle (where nothing after it, nor the stop's first part, is sent)."""
    whole = rt.generate("hello there", max_new_tokens=24, **kwargs)
    pieces = list(rt.stream("hello there", max_new_tokens=24, **kwargs))
    assert "".join(pieces) == whole.text and len(pieces) > (3 if stream_of == "tokens" else 1)
    stop = stop_inside(whole.text)
    cut = rt.generate("hello there", max_new_tokens=24, stop_texts=(stop,), **kwargs)
    pieces = list(rt.stream("hello there", max_new_tokens=24, stop_texts=(stop,), **kwargs))
    assert "".join(pieces) == cut.text == whole.text[:whole.text.find(stop)]
    with pytest.raises(TwoTowerError, match="one prompt"):
        next(rt.stream(["a", "b"]))


def test_generate_warns_as_the_command_does(folder, rt, tmp_path):
    """The command's Warning: lines (a block larger than the denoiser was trained with, a prompt and
    max_new_tokens beyond the stated context) reached no Python caller: they are UserWarnings now, in the
    API's names."""
    import shutil
    import warnings

    trained = rt.cfg.block_size
    with pytest.warns(UserWarning, match=rf"larger blocks give much worse text \(hint: leave out block to use {trained}\)"):
        rt.generate("hello", block=2 * trained, max_new_tokens=4)
    short = tmp_path / "short"
    shutil.copytree(folder, short)
    raw = json.loads((short / "config.json").read_text())
    raw["max_position_embeddings"] = 8
    (short / "config.json").write_text(json.dumps(raw))
    small = twotower_cli.load(str(short), device="cpu")
    n = len(small.tokenizer.encode("hello"))
    with pytest.warns(UserWarning, match=rf"prompt and max_new_tokens reach {n + 16} tokens.*\(hint: use max_new_tokens={8 - n}\)"):
        small.generate("hello", max_new_tokens=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small.generate("hello", max_new_tokens=8 - n)
        rt.generate("hello", block=trained, max_new_tokens=16)


def test_a_call_while_a_stream_is_paused_is_refused_not_given_wrong_text(rt):
    """A paused stream and another call (or another thread) on one Runtime used its one model cache at once: both
    gave other text than alone, without a word. The second call is refused; the stream goes on as if alone, and
    a stream dropped or closed frees the runtime."""
    import threading

    alone = rt.generate("JULIET.", max_new_tokens=24, block=4).text
    pieces = rt.stream("JULIET.", max_new_tokens=24, block=4)
    got = [next(pieces)]
    with pytest.raises(TwoTowerError, match="this Runtime is running another call"):
        rt.generate("ROMEO.", max_new_tokens=4)
    with pytest.raises(TwoTowerError, match="running another call"):
        next(rt.stream("ROMEO.", max_new_tokens=4))
    refused = []

    def other_thread():
        try:
            rt.generate("ROMEO.", max_new_tokens=4)
        except TwoTowerError as e:
            refused.append(e.message)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert refused and "another thread" in refused[0]
    assert "".join(got + list(pieces)) == alone
    paused = rt.stream("JULIET.", max_new_tokens=24, block=4)
    next(paused)
    paused.close()
    assert rt.generate("JULIET.", max_new_tokens=24, block=4).text == alone


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"prompt": {"role": "user", "content": "x"}}, "not one message dict"),  # was two prompts, "role" and "content"
    ({"prompt": None}, "not NoneType None"),  # TypeError: 'NoneType' object is not iterable
    ({"prompt": b"hi"}, "not bytes"),
    ({"prompt": "hi", "stop": "5"}, "stop takes token ids"),  # TypeError: '<=' not supported
    ({"prompt": "hi", "stop_texts": [3]}, "stop_texts takes strings"),
    ({"prompt": "hi", "max_new_tokens": "8"}, "max_new_tokens is a whole number, not str '8'"),
    ({"prompt": "hi", "max_new_tokens": 8.5}, "max_new_tokens is a whole number, not float 8.5"),  # torch's full()
    ({"prompt": "hi", "seed": 1.5}, "seed is a whole number"),  # manual_seed expected a long
    ({"prompt": "hi", "threshold": "0.5"}, "threshold is a number"),
    ({"prompt": "hi", "batch_size": "2"}, "batch_size is a whole number"),
    ({"prompt": [1, 2], "chat": True}, "with chat=True a prompt is a string or a non-empty list of {role, content}"),
    ({"prompt": [{"role": "user"}], "chat": True}, "with chat=True a prompt is"),  # rendered without a word
    ({"prompt": [[]], "chat": True}, "with chat=True a prompt is"),
    ({"prompt": "hi", "chat": True, "template_args": "x"}, "template_args is a dict"),  # ValueError from dict()
])
def test_python_callers_mistakes_are_twotower_errors(rt, kwargs, needle):
    """Wrong types reached the tokenizer, torch or the chat template: TypeError, KeyError, ValueError from deep
    inside, or worse, a result (a message dict read as its keys)."""
    with pytest.raises(TwoTowerError, match=re.escape(needle)):
        rt.generate(**{"max_new_tokens": 4, **kwargs})


def test_python_conveniences_read_as_the_caller_meant(rt, folder, tmp_path):
    """One stop text as a string (it was split into characters: "END" stopped at any E, N or D), one stop id as
    an int (TypeError), no prompts (ValueError from max()), one data file for evaluate (read as its characters)."""
    from twotower_cli import sampler as S
    from twotower_cli.evaluate import evaluate

    text = rt.generate("ROMEO.", max_new_tokens=24).text
    assert len(text) > 3
    stop = text[2:4]
    assert rt.generate("ROMEO.", max_new_tokens=24, stop_texts=stop).text == rt.generate(
        "ROMEO.", max_new_tokens=24, stop_texts=[stop]).text
    ids = rt.generate("ROMEO.", max_new_tokens=24).token_ids
    assert rt.generate("ROMEO.", max_new_tokens=24, stop=ids[3]).token_ids == rt.generate(
        "ROMEO.", max_new_tokens=24, stop=[ids[3]]).token_ids
    assert rt.generate([], max_new_tokens=4) == []
    with pytest.raises(TwoTowerError, match="stream takes no option 'batch_size'"):  # named Runtime._prepare
        next(rt.stream("hi", batch_size=2))
    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    one = evaluate(str(folder), str(data), seq_len=32, max_sequences=4, device="cpu")
    assert one.ar_nll == evaluate(str(folder), [data], seq_len=32, max_sequences=4, device="cpu").ar_nll
    with pytest.raises(TwoTowerError, match="the model is a name or a path, not ''"):
        twotower_cli.load("")
    with pytest.raises(TwoTowerError, match=r"prompt id 99999 is outside the vocabulary"):  # IndexError
        S.run(rt.backend, [[5, 99999]], rt.sampling(S.SamplingConfig(max_new_tokens=2)), rt.eos_ids)
