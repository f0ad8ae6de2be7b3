"""`twotower serve`: a real HTTP server on a free local port, asked as OpenAI clients ask it. The reference for
every reply is the sampler run directly on the same ids (what `generate` prints)."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from tests.twotower_helpers import Widths, add_chat, stop_inside, with_nan, write_random_twotower

from twotower_cli import sampler as S
from twotower_cli.chat import template_ids
from twotower_cli.serve import Engine, Histogram, Piece, Result, in_background
from twotower_cli.text import ChatTemplate, Tokenizer
from twotower_cli.towers import TowerBackend, load_model

CFG = S.SamplingConfig(block_size=4, threshold=0.3, max_new_tokens=12)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    plain = write_random_twotower(tmp_path_factory.mktemp("tt") / "tt")
    return add_chat(shutil.copytree(plain, tmp_path_factory.mktemp("chat") / "tt"))


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder, need_denoiser=True).twotower


def serving(engine, lines=None, **options):
    """A real server on a free local port for `engine` (log lines appended to `lines`): its base URL."""
    return in_background(engine, log=None if lines is None else lines.append, **options)


@pytest.fixture(scope="module")
def url(folder, model):
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test", ChatTemplate.load(folder))
    with serving(engine) as base:
        yield base


def post(url, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def events(text):
    """Server-sent events → the JSON objects, and whether the stream ended with [DONE]."""
    datas = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    return [json.loads(d) for d in datas if d != "[DONE]"], datas[-1] == "[DONE]"


def reference(model, ids, cfg=CFG, eos=(2, 38)):
    return S.run(TowerBackend(model), [ids], cfg, list(eos)).generations[0]


def test_completion_is_the_sampler_on_the_same_ids(url, model, folder):
    tok = Tokenizer(folder)
    status, body = post(url, "/v1/completions", {"prompt": "hello there", "max_tokens": 12})
    assert status == 200, body
    out = json.loads(body)
    want = reference(model, tok.encode("hello there"))
    choice = out["choices"][0]
    assert choice["text"] == tok.decode(want.token_ids) and out["object"] == "text_completion"
    assert choice["finish_reason"] == ("length" if want.finish_reason == "length" else "stop")
    assert out["usage"]["completion_tokens"] == len(want.token_ids) and out["usage"]["prompt_tokens"] == 11


def test_a_list_of_prompts_and_prompts_as_ids(url, model, folder):
    tok = Tokenizer(folder)
    ids = tok.encode("abc")
    status, body = post(url, "/v1/completions", {"prompt": ["hello there", "abc"], "max_tokens": 12})
    assert status == 200, body
    texts = [c["text"] for c in sorted(json.loads(body)["choices"], key=lambda c: c["index"])]
    assert texts == [tok.decode(reference(model, tok.encode(p)).token_ids) for p in ("hello there", "abc")]
    status, body = post(url, "/v1/completions", {"prompt": ids, "max_tokens": 12})
    assert json.loads(body)["choices"][0]["text"] == texts[1]


def test_stream_adds_up_to_the_whole_reply(url):
    whole = json.loads(post(url, "/v1/completions", {"prompt": "what now", "max_tokens": 12})[1])
    status, body = post(url, "/v1/completions", {"prompt": "what now", "max_tokens": 12, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    assert status == 200
    chunks, done = events(body)
    assert done and len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) > 1  # block by block
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_stop_strings_cut_the_text_and_end_the_sampling(url, model, folder, mode):
    """The text ends before the first stop string, sampling ends at the block (ar: token) that wrote it, and
    a stream never sends text it has to take back (ar streams a token at a time: the stop's first
    character arrives one token before the stop is complete)."""
    tok = Tokenizer(folder)
    free_ids = reference(model, tok.encode("hello there"), replace_cfg(max_new_tokens=24, mode=mode)).token_ids
    free = tok.decode(free_ids)
    stop = free[5:7]  # a string the free run writes
    assert len(stop) == 2 and free.find(stop) == 5
    body = {"prompt": "hello there", "max_tokens": 24, "stop": [stop, "never-written"], "mode": mode}
    out = json.loads(post(url, "/v1/completions", body)[1])
    assert out["choices"][0]["text"] == free[:free.find(stop)] and out["choices"][0]["finish_reason"] == "stop"
    # completion tokens: those through the stop string (the fewest whose text holds it), not the whole block
    through = next(k for k in range(1, 25) if stop in tok.decode(free_ids[:k]))
    assert out["usage"]["completion_tokens"] == through
    chunks, _ = events(post(url, "/v1/completions", {**body, "stream": True})[1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == free[:free.find(stop)]


def test_looking_for_a_stop_string_decodes_the_newest_ids_not_the_whole_reply(folder, model):
    """The stop strings are looked for after every step of a block, on the ids a new one could end in (the
    block and a few tokens a character before it), not the whole reply decoded each time: a request that
    never writes its stop decodes its whole reply only for its answer."""
    class Counting(Tokenizer):
        lengths: list[int] = []

        def decode(self, ids, **kw):
            self.lengths.append(len(ids))
            return super().decode(ids, **kw)

    tok = Counting(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], replace_cfg(max_new_tokens=200), "tiny-test", None)
    with serving(engine) as base:
        body = {"prompt": "hello there", "max_tokens": 200, "stop": ["\x00"], "mode": "mask_diffusion"}
        out = json.loads(post(base, "/v1/completions", body)[1])
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 200
    window = 4 + 4 * (len("\x00") + 2)  # block 4, then 4 tokens a character of the stop and 2 more
    whole = [n for n in tok.lengths if n > window]
    assert len(tok.lengths) > 50 and len(whole) <= 2, whole  # was one whole-reply decode per step


def replace_cfg(**kw):
    return S.SamplingConfig(**{**CFG.__dict__, **kw})


def test_chat_completion_renders_the_template(url, model, folder):
    tok, template = Tokenizer(folder), ChatTemplate.load(folder)
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "who are you?"}]
    body = {"messages": messages, "max_tokens": 12, "chat_template_kwargs": {"enable_thinking": False}}
    out = json.loads(post(url, "/v1/chat/completions", body)[1])
    ids = tok.encode(template.render(messages, enable_thinking=False), add_special_tokens=False)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": tok.decode(reference(model, ids).token_ids)}
    chunks, done = events(post(url, "/v1/chat/completions", {**body, "stream": True})[1])
    assert done and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == out["choices"][0]["message"]["content"] and chunks[0]["object"] == "chat.completion.chunk"


TOOL_CALLS = [{"id": "call_1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]


def test_chat_takes_null_content_and_streams_a_role_for_every_choice(url):
    """An assistant message with tool calls whose content is null or absent (OpenAI's shape for a turn that
    only called tools) reads as empty, not a 400; a stream of n choices opens each with its role, as OpenAI's
    does (only the first had one)."""
    def ask(content, **more):
        said = {"role": "assistant", "tool_calls": TOOL_CALLS}
        if content != "absent":
            said["content"] = content
        body = {"messages": [{"role": "user", "content": "hi"}, said,
                             {"role": "user", "content": "and?"}], "max_tokens": 8, **more}
        return post(url, "/v1/chat/completions", body)

    null, absent, empty = ask(None), ask("absent"), ask("")
    assert null[0] == 200 and absent[0] == 200, (null, absent)
    assert json.loads(null[1])["choices"] == json.loads(empty[1])["choices"] == json.loads(absent[1])["choices"]
    chunks, done = events(ask("", stream=True, n=2)[1])
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    assert done and roles == [0, 1], chunks


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user"}], "messages[0] (user) has no 'content'"),
    ([{"role": "user", "content": None}], "messages[0] (user) has a null 'content'"),
    ([{"role": "system", "content": "be brief"}, {"role": "user"}], "messages[1] (user) has no 'content'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "and?"}],
     "messages[1] (assistant) has no 'content'"),  # no tool calls: nothing said at all
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []},
      {"role": "user", "content": "and?"}], "messages[1] (assistant) has a null 'content'"),
    ([{"role": "user", "content": 5}], "messages[0]: a message's 'content' must be a string"),
])
def test_chat_message_without_content_is_a_400_naming_it(url, messages, needle):
    """A message with no content (or a null one) is refused as OpenAI refuses it, naming the message; it was a
    200 with a reply to an empty message. Only an assistant message with tool calls may go without
    (`test_chat_takes_null_content_and_streams_a_role_for_every_choice`)."""
    got, text = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert got == 400, text
    error = json.loads(text)["error"]
    assert error["message"].startswith(needle) and error["type"] == "invalid_request_error", error
    assert "only an assistant message with tool_calls" in error["message"] or "content' must be" in needle


class StoppedServer:
    """A stand-in for `serve.make_server`'s server that stops at once, as Ctrl-C would (a CLI start is no hang)."""
    server_address = ("127.0.0.1", 1)

    def serve_forever(self):
        raise KeyboardInterrupt

    def server_close(self):
        pass


def test_cli_serve_refuses_a_chat_arg_the_server_sets(folder, monkeypatch):
    """--chat-arg messages=... made every chat request a 500; now it is refused at the start (the server is
    replaced by one that stops at once, as Ctrl-C would, so that a start is no hang)."""
    from typer.testing import CliRunner

    import twotower_cli.serve
    from twotower_cli.cli import get_app

    monkeypatch.setattr(twotower_cli.serve, "make_server", lambda *a, **kw: StoppedServer())
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--chat-arg", "messages=[]"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "--chat-arg cannot set messages" in lines[0], r.output


def test_a_growing_conversation_reads_only_its_new_ids(url, folder):
    """Requests share one PrefixReuse backend: the second turn of a conversation reads only what is new."""
    messages = [{"role": "user", "content": "hello"}]
    first = json.loads(post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8})[1])
    messages += [first["choices"][0]["message"], {"role": "user", "content": "and then?"}]
    second = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8})
    assert second[0] == 200
    # the test template renders the past reply without the <think></think> it was generated after: the
    # state kept at the end of the first user message serves (chat.start_from)
    before = Tokenizer(folder).encode(ChatTemplate.load(folder).render(messages[:1], add_generation_prompt=False),
                                      add_special_tokens=False)
    assert json.loads(second[1])["usage"]["prompt_tokens_details"]["cached_tokens"] == len(before) > 0
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < first["usage"]["prompt_tokens"]
    # the reference: the same conversation as a fresh run (a reused state must not change the reply)
    tok, template = Tokenizer(folder), ChatTemplate.load(folder)
    ids = tok.encode(template.render(messages), add_special_tokens=False)
    model = load_model(folder, need_denoiser=True).twotower
    want = S.run(TowerBackend(model), [ids], replace_cfg(max_new_tokens=8), [2, 38]).generations[0]
    assert json.loads(second[1])["choices"][0]["message"]["content"] == tok.decode(want.token_ids)



@pytest.mark.parametrize("keep", [1, 2])
def test_two_clients_conversations_each_keep_their_state(folder, model, keep):
    """Client A's first turn, then client B's, then A's second: with room for two conversations A's second
    turn starts from A's state at its first user message; with room for one, B's took its place and A's
    history is read again. The replies are those of a fresh run either way."""
    tok, template = Tokenizer(folder), ChatTemplate.load(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test", template, conversations=keep)
    with serving(engine, []) as base:
        a = [{"role": "user", "content": "hello"}]
        first = json.loads(post(base, "/v1/chat/completions", {"messages": a, "max_tokens": 8})[1])
        post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "who are you"}], "max_tokens": 8})
        a += [first["choices"][0]["message"], {"role": "user", "content": "and then?"}]
        second = json.loads(post(base, "/v1/chat/completions", {"messages": a, "max_tokens": 8})[1])
    history = tok.encode(template.render(a[:1], add_generation_prompt=False), add_special_tokens=False)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(history) if keep == 2 else 0)
    want = S.run(TowerBackend(model), [tok.encode(template.render(a), add_special_tokens=False)],
                 replace_cfg(max_new_tokens=8), [2, 38]).generations[0]
    assert second["choices"][0]["message"]["content"] == tok.decode(want.token_ids)

def test_an_ar_request_is_not_refused_over_steps_it_does_not_use(url):
    """A request in mode ar with steps beyond the block (the server's 4, or its own block_size) gets the reply
    of one without them (it was a 400: 'steps 9 must be between 1 and the block size 4'); in mask_diffusion
    that is still a 400 (test_bad_requests_get_an_openai_error)."""
    body = {"prompt": "hi", "max_tokens": 4, "mode": "ar"}
    status, want = post(url, "/v1/completions", body)
    assert status == 200, want
    for extra in ({"steps": 9}, {"steps": 3, "block_size": 2}):
        status, got = post(url, "/v1/completions", {**body, **extra})
        assert status == 200, got
        assert json.loads(got)["choices"] == json.loads(want)["choices"]


def test_cli_serve_refuses_an_empty_api_key(folder, monkeypatch):
    """`--api-key "$UNSET"` turned authentication off without a word: an open server. It is an error now."""
    from typer.testing import CliRunner

    import twotower_cli.serve
    from twotower_cli.cli import get_app

    monkeypatch.setattr(twotower_cli.serve, "make_server", lambda *a, **k: StoppedServer())
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--api-key", ""])
    assert r.exit_code == 1 and r.stderr.startswith("Error: --api-key is empty"), r.output


def test_cli_serve_in_ar_is_not_refused_over_steps_it_does_not_use(folder, monkeypatch):
    """serve --mode ar loads no denoiser, so no request can sample by blocks: --steps beyond the block (4) is
    nothing to refuse (it was an Error line); in mask_diffusion it still is, before the server starts."""
    from typer.testing import CliRunner

    import twotower_cli.serve
    from twotower_cli.cli import get_app

    engines = []
    monkeypatch.setattr(twotower_cli.serve, "make_server", lambda engine, *a, **k: engines.append(engine) or StoppedServer())
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--mode", "ar", "--steps", "9"])
    assert r.exit_code == 0 and [e.defaults.steps for e in engines] == [9], r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--steps", "9"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: steps 9 must be between 1 and the block size 4"), r.output


@pytest.mark.parametrize("path, body, status, needle, param", [
    ("/v1/completions", None, 400, "not valid JSON", None),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "'n' must be between 1 and 16", "n"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "'n' must be between 1 and 16", "n"),
    ("/v1/completions", {}, 400, "'prompt' must be", "prompt"),
    ("/v1/completions", {"prompt": [999]}, 400, "outside the vocabulary", "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be a number", "temperature"),
    ("/v1/completions", {"prompt": "hi", "steps": 9}, 400, "'steps' 9 must be between 1 and the block size 4", "steps"),
    # the sampler's checks name the field as the request does, in the message and in `param` (they were
    # "top-p 0.0 must be in (0, 1]" with param null)
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "'top_p' 0.0 must be in (0, 1]", "top_p"),
    ("/v1/completions", {"prompt": "hi", "threshold": 2}, 400, "'threshold' 2.0 must be in (0, 1]", "threshold"),
    ("/v1/completions", {"prompt": "hi", "mode": "foo"}, 400, "'mode' 'foo' is not one of", "mode"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "'temperature' -1.0 must be a finite number",
     "temperature"),
    ("/v1/completions", {"prompt": "hi", "block_size": 0}, 400, "'block_size' 0 must be at least 1", "block_size"),
    # true or false, not read by truthiness ("false" streamed, "yes" echoed)
    ("/v1/completions", {"prompt": "hi", "stream": "false"}, 400, "'stream' must be true or false, not 'false'",
     "stream"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "'echo' must be true or false", "echo"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "false"}}, 400,
     "'include_usage' must be true or false", "include_usage"),
    ("/v1/completions", {"prompt": "hi", "stream_options": [1]}, 400, "'stream_options' must be an object",
     "stream_options"),
    # half a surrogate pair ("\ud800" in the JSON) is no text: it was a 500, "TextInputSequence must be str"
    ("/v1/completions", {"prompt": "a\ud800b"}, 400, "'prompt' holds a lone UTF-16 surrogate", "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\udc00"]}, 400, "'stop' holds a lone UTF-16 surrogate", "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400,
     "'messages' holds a lone UTF-16 surrogate", "messages"),
    ("/v1/completions", {"prompt": "hi", "stop": 3}, 400, "'stop'", "stop"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "'max_tokens' -1 must be 0 or more", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "maximum context length", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "between 0 and 20", "logprobs"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 1}, 400, "not supported", "presence_penalty"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages'", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "roles must alternate", None),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "has no 'content'", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "a text part needs a string 'text'", "messages"),  # was read as empty text
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 400,
     "a text part needs a string 'text'", "messages"),  # was read as "3"
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "needs 'logprobs'", "top_logprobs"),
    ("/v1/nope", {}, 404, "no route", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "chat_template_kwargs": {"messages": []}}, 400, "cannot set messages",
     "chat_template_kwargs"),  # was a 500
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_tokens 0 asks for nothing", "max_completion_tokens"),  # was read as unset
])
def test_bad_requests_get_an_openai_error(url, path, body, status, needle, param):
    """An OpenAI error object: its message, and `param` naming the request field at fault, as OpenAI's do (it
    was always null; the openai package reads it as `error.param`)."""
    got, text = post(url, path, body, raw=b"{bad" if body is None else None)
    assert got == status, text
    error = json.loads(text)["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error", error
    assert error["param"] == param, error
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200  # the server lives on


@pytest.mark.parametrize("raw, needle", [
    (b'{"prompt": "hi", "max_tokens": Infinity}', "'max_tokens' must be an integer, not inf"),
    (b'{"prompt": "hi", "max_tokens": NaN}', "'max_tokens' must be an integer, not nan"),
    (b'{"prompt": "hi", "max_tokens": 1e400}', "'max_tokens' must be an integer, not inf"),
    (b'{"prompt": "hi", "seed": -Infinity}', "'seed' must be an integer, not -inf"),
    (b'{"prompt": "hi", "top_p": NaN}', "'top_p' must be a number, not nan"),
])
def test_numbers_json_cannot_hold_are_a_bad_request(url, raw, needle):
    """Python's json reads NaN, Infinity and 1e400 as floats: a 400 naming the field, not a 500."""
    got, text = post(url, "/v1/completions", None, raw=raw)
    assert got == 400 and json.loads(text)["error"]["message"] == needle, text


def test_json_nested_deeper_than_the_parser_goes_is_a_bad_request(url):
    """json.loads raises RecursionError (not ValueError) for deep nesting: it was a 500."""
    got, text = post(url, "/v1/completions", None, raw=b"[" * 100_000 + b"]" * 100_000)
    assert got == 400 and json.loads(text)["error"]["message"] == "the request body is not valid JSON", text
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_a_seed_beyond_64_bits_is_a_bad_request_and_the_model_goes_on(folder, model):
    """torch's generators take 64-bit seeds: a larger one is a 400 (it used to end the model's thread, and
    every later request waited for ever)."""
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    with serving(engine) as base:
        for seed in (1 << 64, -(1 << 63) - 1):
            got, text = post(base, "/v1/completions", {"prompt": "hi", "seed": seed, "temperature": 1.0})
            assert got == 400 and "'seed' must be a 64-bit integer" in json.loads(text)["error"]["message"], text
        for seed in ((1 << 64) - 1, -(1 << 63)):  # the ends of the range sample
            body = {"prompt": "hi", "seed": seed, "temperature": 1.0, "max_tokens": 2}
            assert post(base, "/v1/completions", body)[0] == 200


def test_an_error_setting_up_a_batch_answers_its_requests_and_the_model_goes_on(folder, model, monkeypatch):
    """A batch that fails before its first block (here: building it) answers its requests with a 500; the
    model's thread lives on and the next request is the sampler's."""
    from twotower_cli import serve

    tok = Tokenizer(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test")

    def broken(*args, **kw):
        raise RuntimeError("no batch (test)")

    lines = []
    with serving(engine, lines) as base:
        monkeypatch.setattr(serve, "Continuous", broken)
        failed = post(base, "/v1/completions", {"prompt": "hello there", "max_tokens": 12})
        monkeypatch.undo()
        after = json.loads(post(base, "/v1/completions", {"prompt": "hello there", "max_tokens": 12})[1])
    assert failed[0] == 500 and "no batch (test)" in json.loads(failed[1])["error"]["message"]
    # the log says why (it showed the access line's "500" alone)
    assert "/v1/completions · failed: RuntimeError: no batch (test)" in lines, lines
    assert engine.counts["failed_requests_total"] == 1
    assert after["choices"][0]["text"] == tok.decode(reference(model, tok.encode("hello there")).token_ids)


def test_concurrent_requests_each_get_their_own_reply(url, model, folder):
    """Requests from several clients at once share one model: each still gets the sampler's reply on its own
    ids (the lock runs them one at a time; without it they would interleave on one cache)."""
    tok = Tokenizer(folder)
    prompts = ["hello there", "abc", "what now", "tell me more"]
    want = [tok.decode(reference(model, tok.encode(p)).token_ids) for p in prompts]
    got = [None] * len(prompts)

    def ask(i):  # half of them streamed
        body = {"prompt": prompts[i], "max_tokens": 12, "stream": i % 2 == 1}
        text = post(url, "/v1/completions", body)[1]
        got[i] = ("".join(c["choices"][0]["text"] for c in events(text)[0]) if body["stream"]
                  else json.loads(text)["choices"][0]["text"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_a_body_over_the_limit_is_refused_unread(url, monkeypatch):
    from twotower_cli import serve

    monkeypatch.setattr(serve, "MAX_BODY_BYTES", 100)
    status, text = post(url, "/v1/completions", {"prompt": "x" * 200})
    assert status == 413 and "over" in json.loads(text)["error"]["message"]


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "\u00b2"])  # '²' (latin-1) is a digit to str.isdigit
def test_a_content_length_that_is_no_number_of_bytes_is_a_bad_request(url, length):
    """A 400 (not a 500, and for -1 not a read that waits for the client to close)."""
    import http.client
    import urllib.parse

    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", length)
    conn.endheaders(b'{"prompt": "hi"}')
    r = conn.getresponse()
    assert r.status == 400 and "Content-Length" in json.loads(r.read())["error"]["message"]
    conn.close()


def test_each_completion_is_logged_with_its_numbers(folder, model):
    lines = []
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    with serving(engine, lines) as base:
        for stream in (False, True):
            assert post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": stream})[0] == 200
    reports = [ln for ln in lines if ln.startswith("/v1/completions · prompt 2 tok")]
    assert len(reports) == 2 and all("4 tok · NFE" in ln for ln in reports), lines
    assert sum('"POST /v1/completions HTTP/1.1" 200' in ln for ln in lines) == 2


def test_fields_the_server_does_not_read_are_named_in_the_log(folder, model):
    """A typo ("max_token") or another server's option changes nothing: it is answered, and the log names it
    (once per request); fields the server reads, and unhonoured ones at their neutral values, are not named."""
    lines = []
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test", ChatTemplate.load(folder))
    with serving(engine, lines) as base:
        status, _ = post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "max_token": 9, "user": "u1",
                                                   "presence_penalty": 0, "stream_options": None})
        assert status == 200
        assert post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2, "temperature": 0})[0] == 200
    named = [ln for ln in lines if "fields ignored" in ln]
    assert named == ["/v1/completions · fields ignored (they change nothing here): 'max_token', 'user'"], lines


def test_models_and_health(url):
    with urllib.request.urlopen(url + "/v1/models") as r:
        model = json.load(r)["data"][0]
    assert model["id"] == "tiny-test" and model["max_model_len"] == 4096  # as vLLM's: the context a client has
    for path in ("/v1/models/tiny-test", "/models/tiny-test"):  # openai's `client.models.retrieve(id)`
        with urllib.request.urlopen(url + path) as r:
            assert json.load(r) == model
    with urllib.request.urlopen(url + "/health?probe=1") as r:
        assert json.load(r) == {"status": "ok"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_names_its_id_in_the_x_request_id_header(url, stream):
    """OpenAI's clients read a request's id from `x-request-id` (`raw.request_id`, and in their errors' and
    logs' text); it was absent. It is the reply's own id, streamed or not."""
    body = json.dumps({"prompt": "hello", "max_tokens": 4, "stream": stream}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        rid, text = r.headers["x-request-id"], r.read().decode()
    ids = {e["id"] for e in events(text)[0]} if stream else {json.loads(text)["id"]}
    assert ids == {rid} and rid.startswith("cmpl-")


def test_a_model_is_retrieved_by_its_id_quoted_or_not(folder, model):
    """`GET /v1/models/{id}` (openai's `models.retrieve`) was a 404 for every id. It answers the served model
    for its id, whose `/` a client sends as %2F (a served folder's path), and a 404 naming the id it serves
    for any other, with OpenAI's code."""
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2], CFG, "/models/tiny twotower", None)
    with serving(engine) as base:
        with urllib.request.urlopen(base + "/v1/models") as r:
            listed = json.load(r)["data"][0]
        for path in ("/v1/models/%2Fmodels%2Ftiny%20twotower", "/v1/models//models/tiny%20twotower"):
            with urllib.request.urlopen(base + path) as r:
                assert json.load(r) == listed
        req = urllib.request.Request(base + "/v1/models/%2Fmodels%2Ftiny%20twotower", method="HEAD")
        with urllib.request.urlopen(req) as r:
            assert r.status == 200 and r.read() == b""
        for path in ("/v1/models/gpt-4o", "/v1/models/"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + path)
            error = json.load(e.value)["error"]
            assert e.value.code == 404 and error["code"] == "model_not_found", error
            assert "'/models/tiny twotower'" in error["message"]
        status, text = post(base, "/v1/models/gpt-4o", {})
        assert status == 405 and "use GET" in text


def test_held_back_text_never_ends_in_a_stop_prefix_or_a_broken_character():
    from twotower_cli.text import hold_back as hold

    assert hold("abc</", ["</s>"]) == "abc" and hold("abc<", ["</s>", "<|end"]) == "abc"
    assert hold("abc", ["</s>"]) == "abc" and hold("ab\ufffd", []) == "ab" and hold("a</s", ["</s>"]) == "a"


def test_a_completion_that_continues_the_last_one_reads_only_the_rest(url, model, folder):
    """Prompts as ids (a random model writes ids the test tokenizer cannot spell): the reply's ids from
    the reference run, then a prompt that continues prompt + reply."""
    ids = Tokenizer(folder).encode("abc abc")
    post(url, "/v1/completions", {"prompt": ids, "max_tokens": 12})
    reply = reference(model, ids).token_ids
    assert len(reply) == 12
    second = json.loads(post(url, "/v1/completions", {"prompt": ids + reply + [5], "max_tokens": 4})[1])
    # held: the first prompt and its first two blocks of 4 (the last block is never fed back)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(ids) + 8


# ------------------------------------------------------------------------------------------- the command

def test_cli_serve_refuses_bad_options_in_one_line(folder, tmp_path):
    import socket

    from typer.testing import CliRunner

    from twotower_cli.cli import get_app

    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--port", "70000"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: port 70000"), r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--max-batch", "0"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: max batch 0 must be at least 1"), r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--conversations", "0"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: conversations 0 must be at least 1"), r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--max-waiting", "-1"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: max waiting -1 must be 0 (no limit) or more"), r.output
    plain = shutil.copytree(folder, tmp_path / "plain")
    (plain / "chat_template.jinja").unlink()
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(plain), "--chat-arg", "a=1"])
    assert r.exit_code == 1 and "no chat template" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--port", str(port)])
    assert r.exit_code == 1 and "cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.output, r.output


def test_cli_serve_a_taken_port_or_foreign_host_is_refused_before_the_model_is_fetched(folder, monkeypatch):
    """`serve` learnt that its port was taken only after the download and load (minutes for the real model);
    it now asks first. The bind after the load keeps its own check (the port may be taken in between)."""
    import socket

    from typer.testing import CliRunner

    import twotower_cli.serve
    from twotower_cli import runtime
    from twotower_cli.cli import get_app

    def fetch(*a, **k):
        raise AssertionError("fetched the model before checking the address")

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with monkeypatch.context() as m:
            m.setattr(runtime, "fetch_model", fetch)
            early = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--port", str(port)])
            host = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--host", "nohost.invalid"])
        # taken between the check and the bind: the same line, after the load
        monkeypatch.setattr(twotower_cli.serve, "check_address", lambda host, port: None)
        late = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--port", str(port)])
    want = f"Error: cannot listen on 127.0.0.1:{port}: Address already in use (hint: pick another --port, or stop what holds this one)\n"
    assert early.exit_code == late.exit_code == 1 and early.stderr == late.stderr == want, (early.output, late.output)
    assert host.exit_code == 1 and host.stderr.startswith("Error: cannot listen on nohost.invalid:8080"), host.output
    assert "(hint: --host takes an address of this machine" in host.stderr, host.output


def test_cli_serve_block_defaults_to_the_checkpoints(folder, monkeypatch):
    """No --block: the engine's default block is the checkpoint's training block (write_twotower records 4);
    a larger --block warns; so does a public --host without an API key. The server is replaced by one that
    stops at once, as Ctrl-C would."""
    from typer.testing import CliRunner

    import twotower_cli.serve
    from twotower_cli.cli import get_app

    engines = []

    def fake_make_server(engine, host, port, log=None, api_key=None, allowed_origins=()):
        engines.append(engine)
        return StoppedServer()

    monkeypatch.setattr(twotower_cli.serve, "make_server", fake_make_server)
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder)])
    assert r.exit_code == 0 and "Warning" not in r.stderr and "block 4)" in r.stderr, r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--block", "8", "--no-continuous",
                                       "--max-waiting", "32"])
    assert r.exit_code == 0 and "Warning: block 8 is larger than the block this denoiser was trained with (4" in r.stderr
    assert [e.defaults.block_size for e in engines] == [4, 8] and [e.continuous for e in engines] == [True, False]
    assert [e.max_waiting for e in engines] == [0, 32]
    # beyond the loopback, without an API key: a warning; with one, the start line says it is required
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--host", "0.0.0.0"])
    assert r.exit_code == 0 and "Warning: listening on 0.0.0.0 without an API key" in r.stderr, r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--host", "0.0.0.0"],
                           env={"TWOTOWER_API_KEY": "k"})
    assert r.exit_code == 0 and "Warning" not in r.stderr and "API key required" in r.stderr, r.output


def test_an_ipv6_host_is_served_and_a_bad_host_gets_a_host_hint(folder, model):
    """--host ::1 serves (the server was IPv4 only: "Address family for hostname not supported"); a host that
    is no address of this machine names --host in its hint, not --port."""
    import socket

    from typer.testing import CliRunner

    from twotower_cli.cli import get_app

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    with serving(engine, host="::1") as base:
        assert base.startswith("http://[::1]:")
        assert post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--host", "nohost.invalid", "--port", "0"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "cannot listen on nohost.invalid" in lines[0], r.output
    assert "--host" in lines[0] and "--port" not in lines[0], r.output


# ------------------------------------------------------------------------------------------- batching

def ask_all_while_busy(engine, base, bodies):
    """Post every body at once while the model is busy (the test holds its lock), let it go once all are
    queued; the replies (streams joined into one text per prompt), in order."""
    got = [None] * len(bodies)

    def ask(i):
        status, text = post(base, "/v1/completions", bodies[i])
        assert status == 200, text
        if bodies[i].get("stream"):
            chunks = events(text)[0]
            n = max(c["choices"][0]["index"] for c in chunks) + 1
            got[i] = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == j)
                      for j in range(n)]
        else:
            got[i] = [c["text"] for c in json.loads(text)["choices"]]

    all_while_busy(engine, [lambda i=i: ask(i) for i in range(len(bodies))])
    return got


def all_while_busy(engine, calls):
    """Start every call in a thread while the model is busy (the test holds its lock), let it go once each has
    queued its request; wait for all."""
    with engine.lock:
        threads = [threading.Thread(target=call) for call in calls]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(engine.pending) < len(calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(engine.pending) == len(calls)
    for t in threads:
        t.join(60)


def test_requests_waiting_together_are_sampled_as_one_batch(folder, model):
    """Requests queued while the model is busy: those with the same mode and block run as one batch (streamed
    or not, with their own stop strings, max_tokens, threshold and steps, one with two prompts), the other on
    its own; every reply is the sampler's on its prompt alone with its settings."""
    tok = Tokenizer(folder)
    lines = []
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test")
    free = tok.decode(reference(model, tok.encode("abc")).token_ids)
    stop = free[4:6]
    bodies = [{"prompt": "hello there", "max_tokens": 12},
              {"prompt": "abc", "max_tokens": 12, "stop": [stop], "stream": True},
              {"prompt": ["what now", "x"], "max_tokens": 12},
              {"prompt": "tell me more", "max_tokens": 7, "stream": True},
              {"prompt": "hello there", "max_tokens": 12, "threshold": 0.9, "steps": 2},  # its own, in the batch
              {"prompt": "hello there", "max_tokens": 12, "mode": "ar"}]  # another mode: a batch of its own
    with serving(engine, lines) as base:
        got = ask_all_while_busy(engine, base, bodies)
    want = [[tok.decode(reference(model, tok.encode(p), replace_cfg(
        max_new_tokens=b["max_tokens"], threshold=b.get("threshold", CFG.threshold), steps=b.get("steps"),
        mode=b.get("mode", CFG.mode))).token_ids) for p in ([b["prompt"]] if isinstance(b["prompt"], str) else b["prompt"])]
        for b in bodies]
    want[1] = [want[1][0][:want[1][0].find(stop)]]
    assert got == want
    assert want[4] != want[0]  # its own threshold and steps made a difference
    reports = [ln for ln in lines if ln.startswith("/v1/completions · prompt")]
    batched = [ln for ln in reports if ln.endswith("· batch of 5 requests")]
    assert len(batched) == 5 and len(reports) == 6, reports
    assert all("(0 cached)" in ln for ln in batched), batched  # a batch reads its prompts afresh


def test_ar_requests_that_differ_only_in_block_size_share_a_batch(folder, model):
    """ar and mock_ar use no blocks and no mask id: requests that differ only there run as one batch, each
    reply the sampler's on its prompt alone; mask_diffusion requests of different blocks still do not."""
    tok = Tokenizer(folder)
    lines = []
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test")
    bodies = [{"prompt": "hello there", "max_tokens": 6, "mode": mode, **extra}
              for mode in ("ar", "mock_ar", "mask_diffusion")
              for extra in ({}, {"block_size": 2}, {"block_size": 3, "steps": 3})]
    with serving(engine, lines) as base:
        got = ask_all_while_busy(engine, base, bodies)
    for body, text in zip(bodies, got, strict=True):
        cfg = replace_cfg(max_new_tokens=6, mode=body["mode"], block_size=body.get("block_size", CFG.block_size),
                          steps=body.get("steps"))
        assert text == [tok.decode(reference(model, tok.encode(body["prompt"]), cfg).token_ids)], body
    reports = [ln for ln in lines if ln.startswith("/v1/completions · prompt")]
    assert sum(ln.endswith("· batch of 3 requests") for ln in reports) == 6, reports  # ar's three, mock_ar's
    assert sum(not ln.endswith("requests") for ln in reports) == 3, reports  # each mask_diffusion block alone


class Gated(TowerBackend):
    """Its first denoiser forward waits for `gate`; `entered` is set once it is waiting."""

    def __init__(self, model):
        super().__init__(model)
        self.gate, self.entered = threading.Event(), threading.Event()

    def denoise(self, *args, **kw):
        self.entered.set()
        assert self.gate.wait(30)
        return super().denoise(*args, **kw)


def second_comes_while_first_runs(engine, backend, first, second, meanwhile=lambda: None):
    """Call `first` in a thread; once its first block is in the `Gated` denoiser (then `meanwhile()`), call
    `second` in another; once that one waits for the model, let the denoiser go on; wait for both."""
    backend.gate.clear()
    backend.entered.clear()
    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert backend.entered.wait(30)
    meanwhile()
    threads.append(threading.Thread(target=second))
    threads[1].start()
    deadline = time.monotonic() + 30
    while not engine.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    backend.gate.set()
    for t in threads:
        t.join(60)


@pytest.mark.parametrize("continuous", [True, False])
def test_a_request_that_arrives_mid_batch_joins_it_at_the_next_block(folder, model, continuous):
    """A request that comes while a batch runs joins it at its next block (continuous batching), or waits for
    the batch to end (`continuous=False`); either way each reply is the sampler's on its prompt alone."""
    tok = Tokenizer(folder)
    lines = []
    backend = Gated(model)
    engine = Engine(backend, tok, [2, 38], CFG, "tiny-test", continuous=continuous)
    bodies = [{"prompt": "hello there", "max_tokens": 16}, {"prompt": "abc", "max_tokens": 6}]
    got = [None, None]

    def ask(i):
        got[i] = json.loads(post(base, "/v1/completions", bodies[i])[1])["choices"][0]["text"]

    def running():
        assert engine.running == 1 and "twotower_running_requests 1\n" in engine.metrics()

    with serving(engine, lines) as base:
        second_comes_while_first_runs(engine, backend, lambda: ask(0), lambda: ask(1), running)
    want = [tok.decode(reference(model, tok.encode(b["prompt"]), replace_cfg(max_new_tokens=b["max_tokens"])).token_ids)
            for b in bodies]
    assert got == want
    reports = [ln for ln in lines if ln.startswith("/v1/completions · prompt")]
    assert len(reports) == 2 and sum(ln.endswith("· batch of 2 requests") for ln in reports) == 2 * continuous, reports
    assert engine.counts["joined_requests_total"] == int(continuous)
    assert engine.counts["batches_total"] == 2 - continuous and engine.counts["batched_requests_total"] == 2


def test_a_conversation_that_joins_a_running_batch_starts_from_its_kept_state(folder, model):
    """Client A's first turn alone; then, while client B's long request runs, A's second turn joins B's batch:
    it starts from A's state kept at its first user message (`PrefixReuse.join_one`), reads only the rest,
    and replies what a fresh run on the whole conversation replies."""
    tok, template = Tokenizer(folder), ChatTemplate.load(folder)
    lines = []
    backend = Gated(model)
    backend.gate.set()
    engine = Engine(backend, tok, [2, 38], CFG, "tiny-test", template)
    a = [{"role": "user", "content": "hello"}]
    got = {}
    with serving(engine, lines) as base:
        first = json.loads(post(base, "/v1/chat/completions", {"messages": a, "max_tokens": 8})[1])
        a += [first["choices"][0]["message"], {"role": "user", "content": "and then?"}]

        def ask(name, messages, n):
            got[name] = json.loads(post(base, "/v1/chat/completions", {"messages": messages, "max_tokens": n})[1])

        second_comes_while_first_runs(engine, backend, lambda: ask("b", [{"role": "user", "content": "who are you"}], 24),
                                      lambda: ask("a", a, 8))
    history = tok.encode(template.render(a[:1], add_generation_prompt=False), add_special_tokens=False)
    assert got["a"]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(history) > 0
    assert engine.counts["joined_requests_total"] == 1
    for name, messages, n in (("a", a, 8), ("b", [{"role": "user", "content": "who are you"}], 24)):
        want = S.run(TowerBackend(model), [tok.encode(template.render(messages), add_special_tokens=False)],
                     replace_cfg(max_new_tokens=n), [2, 38]).generations[0]
        assert got[name]["choices"][0]["message"]["content"] == tok.decode(want.token_ids), name


def test_a_streamed_request_of_two_choices_joins_a_running_batch(folder, model):
    """n = 2, streamed, joining a running batch: both rows join, each stream's chunks add up to the
    sampler's reply alone."""
    tok = Tokenizer(folder)
    backend = Gated(model)
    engine = Engine(backend, tok, [2, 38], CFG, "tiny-test")
    got = {}

    def ask(name, body):
        got[name] = post(base, "/v1/completions", body)

    with serving(engine) as base:
        second_comes_while_first_runs(engine, backend, lambda: ask("long", {"prompt": "hello there", "max_tokens": 24}),
                                      lambda: ask("two", {"prompt": "abc", "max_tokens": 10, "n": 2, "stream": True}))
    chunks = events(got["two"][1])[0]
    texts = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == j) for j in range(2)]
    want = tok.decode(reference(model, tok.encode("abc"), replace_cfg(max_new_tokens=10)).token_ids)
    assert texts == [want, want] and engine.counts["joined_requests_total"] == 1
    assert sum(1 for c in chunks if c["choices"][0]["index"] == 0 and c["choices"][0]["text"]) > 1  # block by block


def test_chat_turns_that_come_together_each_keep_and_find_their_state(folder, model):
    """Two clients' first turns queued together, then their second turns together: each first turn keeps a
    state at its user message although they share a batch, and each second turn starts from its own."""
    tok, template = Tokenizer(folder), ChatTemplate.load(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test", template)
    talks = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "who are you"}]]
    got = [None, None]

    def ask(i):
        got[i] = json.loads(post(base, "/v1/chat/completions", {"messages": talks[i], "max_tokens": 8})[1])

    with serving(engine) as base:
        all_while_busy(engine, [lambda: ask(0), lambda: ask(1)])
        for i in range(2):
            talks[i] += [got[i]["choices"][0]["message"], {"role": "user", "content": "and then?"}]
        all_while_busy(engine, [lambda: ask(0), lambda: ask(1)])
    for i in range(2):
        history = tok.encode(template.render(talks[i][:1], add_generation_prompt=False), add_special_tokens=False)
        assert got[i]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(history) > 0
        want = S.run(TowerBackend(model), [tok.encode(template.render(talks[i]), add_special_tokens=False)],
                     replace_cfg(max_new_tokens=8), [2, 38]).generations[0]
        assert got[i]["choices"][0]["message"]["content"] == tok.decode(want.token_ids)


def test_a_request_of_more_prompts_than_max_batch_goes_in_part_by_part(folder, model):
    """Five prompts (their own lengths of reply, by end ids) in one request with --max-batch 2, streamed: never
    more than two rows in the model, each prompt's reply the sampler's alone, the choices in prompt order."""
    tok = Tokenizer(folder)

    backend = Widths(model)
    engine = Engine(backend, tok, [2, 38], CFG, "tiny-test", max_batch=2)
    prompts = ["hello there", "abc", "what now", "x", "the quick brown fox"]
    with serving(engine) as base:
        plain = json.loads(post(base, "/v1/completions", {"prompt": prompts, "max_tokens": 12})[1])
        chunks = events(post(base, "/v1/completions", {"prompt": prompts, "max_tokens": 12, "stream": True})[1])[0]
    want = [tok.decode(reference(model, tok.encode(p)).token_ids) for p in prompts]
    assert [c["text"] for c in plain["choices"]] == want
    assert ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == j) for j in range(5)] == want
    assert max(backend.widths) == 2 and plain["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)


class FailsOnce(TowerBackend):
    """Its `fail_at`-th denoiser forward raises, as an out-of-memory error would."""

    def __init__(self, model, fail_at):
        super().__init__(model)
        self.calls, self.fail_at = 0, fail_at

    def denoise(self, *args, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory (test)")
        return super().denoise(*args, **kw)


def test_an_error_in_a_running_batch_answers_its_requests_and_the_next_batch_starts_afresh(folder, model):
    """A forward that fails mid-batch: every request in that batch (one streamed, one with two prompts) gets
    the error (a 500, or an error event in the stream), is counted as failed, and the server goes on: the
    next request's reply is the sampler's."""
    tok = Tokenizer(folder)
    engine = Engine(FailsOnce(model, fail_at=6), tok, [2, 38], CFG, "tiny-test")
    bodies = [{"prompt": "hello there", "max_tokens": 12}, {"prompt": ["what now", "x"], "max_tokens": 12},
              {"prompt": "abc", "max_tokens": 12, "stream": True}]
    with serving(engine) as base:
        got = [None] * 3

        def ask(i):
            got[i] = post(base, "/v1/completions", bodies[i])

        all_while_busy(engine, [lambda i=i: ask(i) for i in range(3)])
        after = json.loads(post(base, "/v1/completions", {"prompt": "hello there", "max_tokens": 12})[1])
    assert [g[0] for g in got[:2]] == [500, 500] and all("CUDA out of memory (test)" in g[1] for g in got)
    assert got[2][0] == 200 and "error" in got[2][1]  # the stream had begun: the error is its last event
    assert engine.counts["failed_requests_total"] == 3 and engine.running == 0
    want = reference(model, tok.encode("hello there"), replace_cfg(max_new_tokens=12))
    assert after["choices"][0]["text"] == tok.decode(want.token_ids)


class NanOnce(FailsOnce):
    """Its `fail_at`-th denoiser forward returns NaN logits, as a NaN weight or an fp16 overflow would."""

    def denoise(self, *args, **kw):
        self.calls += 1
        logits = TowerBackend.denoise(self, *args, **kw)
        return logits.fill_(float("nan")) if self.calls == self.fail_at else logits


def test_nan_logits_answer_their_request_with_the_error_and_the_model_goes_on(folder, model):
    """NaN logits mid-request are a 500 that says so (not a reply of arbitrary ids); the next request's reply
    is the sampler's."""
    tok = Tokenizer(folder)
    backend = NanOnce(model, fail_at=3)
    engine = Engine(backend, tok, [2, 38], CFG, "tiny-test")
    with serving(engine) as base:
        status, text = post(base, "/v1/completions", {"prompt": "hello there", "max_tokens": 12})
        after = json.loads(post(base, "/v1/completions", {"prompt": "hello there", "max_tokens": 12})[1])
        backend.calls = 0  # NaN again at the third denoiser forward, now in a stream
        streamed, stream_text = post(base, "/v1/completions", {"prompt": "hello there", "max_tokens": 12,
                                                               "stream": True})
    message = json.loads(text)["error"]["message"]  # the error's own words and hint, not its type's name
    assert status == 500 and message.startswith("the model's logits are NaN or infinite") and "--dtype" in message
    got, done = events(stream_text)  # the headers were out: the error is the stream's last event
    assert streamed == 200 and done and got[-1]["error"]["message"] == message
    assert engine.counts["failed_requests_total"] == 2
    want = reference(model, tok.encode("hello there"), replace_cfg(max_new_tokens=12))
    assert after["choices"][0]["text"] == tok.decode(want.token_ids)


def test_prompt_logprobs_of_a_nan_model_are_an_error_not_nan(folder, tmp_path):
    """echo's prompt log-probabilities from NaN weights: a 500 that says so, not NaN (which is not JSON)."""
    bad = with_nan(folder, tmp_path / "nan", ("context_tower.norm_f.weight",))
    engine = Engine(TowerBackend(load_model(bad, need_denoiser=True).twotower), Tokenizer(bad), [2, 38], CFG, "nan")
    with serving(engine) as base:
        status, text = post(base, "/v1/completions", {"prompt": "hello there", "max_tokens": 0, "echo": True,
                                                      "logprobs": 1})
    assert status == 500 and json.loads(text)["error"]["message"].startswith("the model's log-probabilities are NaN")


def test_max_waiting_refuses_with_a_503_and_retry_after(folder, model):
    """--max-waiting 1: while one request waits for the busy model, the next is refused at once with a 503,
    an OpenAI error body and Retry-After; the waiting one is answered, and later requests are taken again."""
    tok = Tokenizer(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test", max_waiting=1)
    got = {}
    with serving(engine) as base:
        with engine.lock:
            waiting = threading.Thread(target=lambda: got.update(first=post(base, "/v1/completions",
                                                                          {"prompt": "hello", "max_tokens": 4})))
            waiting.start()
            while not engine.pending:
                time.sleep(0.01)
            req = urllib.request.Request(base + "/v1/completions", data=json.dumps({"prompt": "abc"}).encode(),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=30)
        waiting.join(60)
        later = post(base, "/v1/completions", {"prompt": "abc", "max_tokens": 4})
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    error = json.loads(refused.value.read())["error"]
    assert "busy: 1 requests are waiting" in error["message"] and error["type"] == "server_error"
    assert got["first"][0] == 200 and later[0] == 200 and engine.counts["refused_requests_total"] == 1


def test_max_waiting_holds_when_requests_pass_the_early_check_together(folder, model, monkeypatch):
    """Requests that arrive together all pass `check_room` (asked before a stream's headers) before any is
    queued: the limit is checked again as each is queued, so --max-waiting 1 never lets 2 wait (it did: seen
    as twotower_waiting_requests 2 under bursts of 64 clients). Here the early check lets everything by."""
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test", max_waiting=1)
    monkeypatch.setattr(engine, "check_room", lambda: None)
    got = {}
    with serving(engine) as base:
        with engine.lock:  # the model is busy: requests wait
            first = threading.Thread(target=lambda: got.update(first=post(base, "/v1/completions",
                                                                        {"prompt": "hello", "max_tokens": 4})))
            first.start()
            while not engine.pending:
                time.sleep(0.01)
            second = threading.Thread(target=lambda: got.update(second=post(base, "/v1/completions",
                                                                          {"prompt": "abc", "max_tokens": 4})))
            second.start()
            second.join(30)
            assert len(engine.pending) == 1
        first.join(60)
    assert got["first"][0] == 200 and got["second"][0] == 503, got
    assert engine.counts["refused_requests_total"] == 1


def test_a_burst_of_connections_waits_for_the_server_instead_of_being_reset(folder, model):
    """64 clients connecting at once while the server has not yet taken any (its thread busy): the system
    holds them for it (socketserver's default backlog of 5 dropped the rest, which clients saw as resets and
    timeouts before any answer or 503)."""
    import socket

    from twotower_cli.serve import make_server

    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    server = make_server(engine, "127.0.0.1", 0)  # listening, never accepting
    clients = []
    try:
        for _ in range(64):
            clients.append(socket.create_connection(server.server_address[:2], timeout=3))
    finally:
        for c in clients:
            c.close()
        server.server_close()
        engine.close()
    assert len(clients) == 64


def test_max_batch_and_seeded_sampling_split_the_batches(folder, model):
    tok = Tokenizer(folder)
    lines = []
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test", max_batch=2)
    greedy = [{"prompt": p, "max_tokens": 8} for p in ("hello", "abc", "more")]
    sampled = [{"prompt": "hello", "max_tokens": 8, "temperature": 0.9, "seed": s} for s in (1, 2)]
    with serving(engine, lines) as base:
        got = ask_all_while_busy(engine, base, greedy + sampled)
    for body, text in zip(greedy + sampled, got, strict=True):
        cfg = replace_cfg(max_new_tokens=8, temperature=body.get("temperature", 0.0))
        gen = torch.Generator().manual_seed(body["seed"]) if "seed" in body else None
        ref = S.run(TowerBackend(model), [tok.encode(body["prompt"])], cfg, [2, 38], gen).generations[0]
        assert text == [tok.decode(ref.token_ids)], body
    reports = [ln for ln in lines if ln.startswith("/v1/completions · prompt")]
    assert sum(ln.endswith("· batch of 2 requests") for ln in reports) == 2 and len(reports) == 5, reports


def test_a_reader_that_leaves_does_not_disturb_its_batch(folder, model):
    """Two streamed requests in one batch; one reader stops after its first piece: the other still gets its
    whole reply, piece by piece."""
    tok = Tokenizer(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test")
    reqs = [engine.parse({"prompt": p, "max_tokens": 40, "stream": True}, chat=False) for p in ("hello", "abc")]
    out = {}

    def leave():
        items = engine.run(reqs[0])
        out["left"] = next(items)
        items.close()

    def stay():
        out["stayed"] = list(engine.run(reqs[1]))

    all_while_busy(engine, [leave, stay])
    result = out["stayed"][-1]
    assert isinstance(out["left"], Piece) and isinstance(result, Result) and result.batch == 2
    want = reference(model, tok.encode("abc"), replace_cfg(max_new_tokens=40))
    assert result.texts == [tok.decode(want.token_ids)]
    assert "".join(p.deltas[0] for p in out["stayed"][:-1]) == result.texts[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_before_its_answer_frees_the_model(folder, model, stream):
    """A client that closes its connection while its (long) request runs: its rows end at the next block,
    streamed or not (a non-streamed one used to run to its max_tokens for nobody), and the model goes on."""
    import socket
    import urllib.parse

    huge = 10 ** 6
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test", max_model_len=2 * huge)
    body = json.dumps({"prompt": "hello there", "max_tokens": huge, "stream": stream}).encode()
    with serving(engine) as base:
        where = urllib.parse.urlsplit(base)
        with socket.create_connection((where.hostname, where.port), timeout=30) as client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 30
            while engine.running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.running == 1
        deadline = time.monotonic() + 60
        while engine.counts["requests_total"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.counts["requests_total"] == 1 and engine.running == 0  # its rows ended: answered to nobody
        assert 0 < engine.counts["completion_tokens_total"] < huge
        assert post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_close_answers_the_open_requests_and_ends_the_models_thread(folder, model):
    """`Engine.close` (Ctrl-C): a running request and one waiting behind it (another mode) get a 503, the
    model's thread ends, and a request after it is refused with a 503 too."""
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test", max_model_len=10 ** 7)
    got = {}
    with serving(engine) as base:
        def ask(name, body):
            got[name] = post(base, "/v1/completions", body)

        threads = [threading.Thread(target=ask, args=("running", {"prompt": "hello", "max_tokens": 10 ** 6}))]
        threads[0].start()
        deadline = time.monotonic() + 30
        while engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        threads.append(threading.Thread(target=ask, args=("waiting", {"prompt": "abc", "mode": "ar"})))
        threads[1].start()
        while not engine.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 1 and len(engine.pending) == 1
        engine.close()
        for t in threads:
            t.join(60)
        ask("after", {"prompt": "abc", "max_tokens": 2})
        status, headers, _ = ask_raw(base, "POST", "/v1/completions", body=b'{"prompt": "abc", "max_tokens": 2}')
        assert status == 503 and headers["Connection"] == "close"  # a kept connection is not to be used again
    assert not engine.worker.is_alive() and engine.running == 0
    for name in ("running", "waiting", "after"):
        status, text = got[name]
        assert status == 503 and json.loads(text)["error"]["message"] == "the server is shutting down", (name, text)


def test_close_ends_a_running_stream_with_the_error_the_others_get(folder, model):
    """A stream under way when the server closes (Ctrl-C) ends with an error event and [DONE]: the message the
    requests answered with a 503 get, not the name of the server's own exception class in front of it (it
    read 'BadRequest: the server is shutting down')."""
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test", max_model_len=10 ** 7)
    got = {}
    with serving(engine) as base:
        asking = threading.Thread(target=lambda: got.update(answer=post(
            base, "/v1/completions", {"prompt": "hello", "max_tokens": 10 ** 6, "stream": True})))
        asking.start()
        deadline = time.monotonic() + 30
        while engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.close()
        asking.join(60)
    status, text = got["answer"]
    sent, done = events(text)
    assert status == 200 and done, text[:300]
    assert sent[-1] == {"error": {"message": "the server is shutting down", "type": "server_error", "param": None,
                                  "code": None}}, sent[-1]


SLOW_503 = """
import http.server, time
send_response = http.server.BaseHTTPRequestHandler.send_response
def slow(self, code, message=None):
    if code == 503:
        time.sleep(0.5)  # the answer is still being written when the server closes
    send_response(self, code, message)
http.server.BaseHTTPRequestHandler.send_response = slow
from twotower_cli.cli import main
main()
"""


@pytest.mark.parametrize("slow_answer", [False, True])
def test_ctrl_c_stops_the_server_cleanly_while_it_samples(folder, tmp_path, slow_answer):
    """SIGINT to `twotower serve` while a request runs: exit code 0, 'stopped', the client answered with a
    503, the port free (the interpreter used to exit under the model's thread: "terminate called without an
    active exception", exit code 134). `slow_answer`: the 503 takes half a second to write, and is still
    written (request threads are daemon threads: the process used to exit under them, and the client got a
    closed connection instead of its answer)."""
    import os
    import re
    import signal
    import socket
    import subprocess
    import sys

    run = ["-c", SLOW_503] if slow_answer else ["-m", "twotower_cli"]
    proc = subprocess.Popen([sys.executable, *run, "serve", "--model", str(folder), "--port", "0",
                             "--max-model-len", str(10 ** 7)],  # room for a request that runs until it is stopped
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored as in `&`
    try:
        first = proc.stderr.readline()
        base = re.search(r"(http://[\d.]+:\d+)/v1", first).group(1)
        got = {}

        def ask():
            try:
                got["answer"] = post(base, "/v1/completions", {"prompt": "hello", "max_tokens": 10 ** 6})
            except OSError as e:  # the connection closed without an answer
                got["answer"] = (None, repr(e))

        asking = threading.Thread(target=ask)
        asking.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(base + "/metrics") as r:
                if "twotower_running_requests 1\n" in r.read().decode():
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
        asking.join(60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped" in rest and "terminate" not in rest and "Traceback" not in rest, rest
    assert got["answer"][0] == 503 and "shutting down" in got["answer"][1], got
    with socket.socket() as again:  # the port is free for the next server (which, like this one, reuses addresses)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        again.listen()


# ------------------------------------------------------------------------------------------- logprobs

def test_completion_logprobs_in_ar_are_the_next_token_log_probabilities(url, model, folder):
    """ar: each returned token's logprob is log softmax of the base model's logits at the position before it,
    from one full forward over prompt + reply (not the server's cached decode); the offsets are where each
    token's text starts."""
    tok = Tokenizer(folder)
    body = {"prompt": "hello there", "max_tokens": 12, "mode": "ar", "logprobs": 0}
    out = json.loads(post(url, "/v1/completions", body)[1])["choices"][0]
    lp = out["logprobs"]
    prompt = tok.encode("hello there")
    reply = reference(model, prompt, replace_cfg(mode="ar")).token_ids
    assert [tok.decode([i]) for i in reply] == lp["tokens"] and "".join(lp["tokens"]) == out["text"]
    logits = full_log_softmax(model, prompt + reply)
    want = [logits[len(prompt) + j - 1, t].item() for j, t in enumerate(reply)]
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"], want, strict=True)) < 1e-4
    assert lp["text_offset"] == [len(tok.decode(reply[:j])) for j in range(len(reply))] and lp["top_logprobs"] is None


def test_chat_logprobs_in_mask_diffusion_are_each_tokens_at_its_commit(url, model, folder):
    """mask_diffusion: the probability the denoiser gave each token at the step that committed it (the
    sampler's own Step events, collected here); chat's `content` list spells the reply."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "logprobs": True}
    out = json.loads(post(url, "/v1/chat/completions", body)[1])["choices"][0]
    content = out["logprobs"]["content"]
    tok = Tokenizer(folder)
    prompt = ChatTemplate.load(folder)
    ids = template_ids(prompt, tok, body["messages"], {})[0]
    conf, start = {}, 0
    for ev in S.generate(TowerBackend(model), [ids], CFG, [2, 38]):
        if isinstance(ev, S.BlockStarted):
            start = ev.start
        elif isinstance(ev, S.Step):
            conf.update({start + p: c for p, c in zip(ev.committed[0], ev.confidences[0], strict=True)})
        elif isinstance(ev, S.Finished):
            reply = ev.generations[0].token_ids
    assert [c["token"] for c in content] == [tok.decode([i]) for i in reply]
    assert "".join(c["token"] for c in content) == out["message"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx([math.log(conf[j]) for j in range(len(reply))], abs=1e-6)
    assert all(c["bytes"] == list(c["token"].encode()) and c["top_logprobs"] == [] for c in content)


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "between 0 and 20"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21, "echo": True, "max_tokens": 0}, "between 0 and 20"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "add 'echo' to score the prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 1},
     "needs 'logprobs': true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, "true or false"),
])
def test_logprobs_that_cannot_be_given_are_refused(url, path, body, needle):
    status, text = post(url, path, body)
    assert status == 400 and needle in json.loads(text)["error"]["message"], text



@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_a_streams_logprobs_add_up_to_the_whole_replys(url, model, folder, chat, mode):
    """Streamed with logprobs, each chunk carries the logprobs of the tokens its text completed (the tokens
    of a stop string with the last): joined, the whole reply's — tokens, values, top-k and offsets — two
    prompts (completions) and a stop string included."""
    tok = Tokenizer(folder)
    free = tok.decode(reference(model, tok.encode("hello there"), replace_cfg(max_new_tokens=24, mode=mode)).token_ids)
    stop = stop_inside(free)
    if chat:
        body = {"messages": [{"role": "user", "content": "hello there"}], "logprobs": True, "top_logprobs": 2}
    else:
        body = {"prompt": ["hello there", "and what now?"], "logprobs": 2}
    body |= {"max_tokens": 24, "mode": mode, "stop": [stop]}
    whole = json.loads(post(url, path := "/v1/chat/completions" if chat else "/v1/completions", body)[1])
    chunks, done = events(post(url, path, {**body, "stream": True})[1])
    assert done
    for choice in whole["choices"]:
        i = choice["index"]
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        pieces = [c["logprobs"] for c in mine if c.get("logprobs")]
        assert len(pieces) >= 1
        if chat:
            assert "".join(c["delta"].get("content") or "" for c in mine) == choice["message"]["content"]
            assert [t for p in pieces for t in p["content"]] == choice["logprobs"]["content"]
        else:
            assert "".join(c["text"] for c in mine) == choice["text"]
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                assert [v for p in pieces for v in p[key]] == choice["logprobs"][key], key


@pytest.mark.parametrize("extra", [
    {"max_tokens": 0, "logprobs": 2},  # lm-eval's scoring shape, streamed
    {"max_tokens": 10, "logprobs": 2, "n": 2},
    {"max_tokens": 10, "logprobs": 0, "mode": "ar"},
    {"max_tokens": 10},  # no logprobs: the prompts' text only
], ids=["score", "n2", "ar", "text"])
def test_echo_streams_the_prompt_first_and_adds_up_to_the_whole_reply(url, extra):
    """`echo` with `stream` was a 400 (whole replies only). A stream now opens with each choice's prompt
    (its logprobs object too, scored by the context tower, when asked), then the completion as usual:
    joined, each choice's chunks are the whole reply's text and logprobs, offsets counted from the prompt's
    start as in the whole reply. Two prompts."""
    body = {"prompt": ["hello there", "and what now?"], "echo": True, "stop": ["zz"]} | extra
    whole = json.loads(post(url, "/v1/completions", body)[1])
    chunks, done = events(post(url, "/v1/completions", {**body, "stream": True})[1])
    assert done and len(whole["choices"]) == 2 * extra.get("n", 1)
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert mine[0]["text"] == body["prompt"][choice["index"] // extra.get("n", 1)]  # its prompt, first
        assert "".join(c["text"] or "" for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [choice["finish_reason"]]
        if "logprobs" not in extra:
            assert choice["logprobs"] is None and all(c.get("logprobs") is None for c in mine)
            continue
        pieces = [c["logprobs"] for c in mine if c.get("logprobs")]
        assert pieces[0]["token_logprobs"][0] is None  # the prompt's first token, as in the whole reply
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            if choice["logprobs"][key] is None:  # (top_logprobs with logprobs 0)
                assert all(p[key] is None for p in pieces), key
            else:
                assert [v for p in pieces for v in p[key]] == choice["logprobs"][key], key


@pytest.mark.hf
def test_skip_special_tokens_leaves_them_out_of_the_text(url, model, folder):
    """`skip_special_tokens: true` (vLLM's default; ours keeps them, as `generate` prints them): the text is
    transformers' decode of the same ids with special tokens skipped (bos, pad and the chat tokens alike),
    streamed or not, and completions' `text_offset` counts in that text; `false` (the default) keeps them."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(folder)
    g = reference(model, tok.encode("hello there"), replace_cfg(max_new_tokens=24, mode="ar"))
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    kept, skipped = hf.decode(g.token_ids, skip_special_tokens=False), hf.decode(g.token_ids, skip_special_tokens=True)
    assert kept != skipped  # the reply writes a special token (<think>, </think>, <|im_start|>) besides its end
    body = {"prompt": "hello there", "max_tokens": 24, "mode": "ar"}
    assert json.loads(post(url, "/v1/completions", body)[1])["choices"][0]["text"] == kept
    out = json.loads(post(url, "/v1/completions", {**body, "skip_special_tokens": True, "logprobs": 0})[1])
    choice = out["choices"][0]
    assert choice["text"] == skipped
    ids = g.token_ids
    assert choice["logprobs"]["text_offset"] == [len(hf.decode(ids[:i], skip_special_tokens=True))
                                                 for i in range(len(ids))]
    chunks, _ = events(post(url, "/v1/completions", {**body, "skip_special_tokens": True, "stream": True})[1])
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == skipped
    status, text = post(url, "/v1/completions", {**body, "skip_special_tokens": "yes"})
    assert status == 400 and "'skip_special_tokens' must be true or false" in text


def test_an_api_key_is_asked_of_every_route_but_health(folder, model):
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    def ask(base, path, key=None, body=None):
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    with serving(engine, api_key="s3cret") as base:
        body = {"prompt": "hi", "max_tokens": 2}
        for key in (None, "wrong"):
            for path, b in (("/v1/models", None), ("/v1/completions", body)):
                status, out = ask(base, path, key, b)
                assert status == 401 and out["error"]["code"] == "invalid_api_key", (path, key)
        assert ask(base, "/health")[0] == 200
        assert ask(base, "/v1/models", "s3cret")[0] == 200 and ask(base, "/v1/completions", "s3cret", body)[0] == 200



def test_completion_top_logprobs_in_ar_are_the_next_token_distributions_best(url, model, folder):
    """`logprobs: 3` in ar: at every generated position the 3 most likely tokens of the base model's
    next-token distribution (one full forward over prompt + reply), best first."""
    tok = Tokenizer(folder)
    prompt = tok.encode("hello there")
    out = json.loads(post(url, "/v1/completions", {"prompt": "hello there", "max_tokens": 12, "mode": "ar",
                                                   "logprobs": 3})[1])["choices"][0]["logprobs"]
    reply = reference(model, prompt, replace_cfg(mode="ar")).token_ids
    logits = full_log_softmax(model, prompt + reply)
    for j, top in enumerate(out["top_logprobs"]):
        values, ids = logits[len(prompt) + j - 1].topk(3)
        assert list(top) == [tok.decode([i]) for i in ids.tolist()]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
        assert top[out["tokens"][j]] == out["token_logprobs"][j]  # greedy: the best, and the same number


def test_a_chosen_tokens_logprob_is_the_number_its_top_entry_has(url):
    """A token's own logprob was the log of its probability (a float32 exp, then a float64 log), its entry
    among the top ones the float32 log-softmax: -0.3827099170986257 beside -0.38270995020866394, so a client's
    `token.logprob == top[token]` failed. Both are the top entry's number now, in completions and chat,
    streamed or not, sampled or greedy (a sampled token outside the top ones keeps its own)."""
    for temperature in (0, 1.3):
        body = {"prompt": "hello", "max_tokens": 12, "temperature": temperature, "seed": 3, "logprobs": 3}
        for stream in (False, True):
            text = post(url, "/v1/completions", body | {"stream": stream})[1]
            choices = [e["choices"][0]["logprobs"] for e in events(text)[0]] if stream else \
                [json.loads(text)["choices"][0]["logprobs"]]
            pairs = [(t, v, top) for lp in choices if lp
                     for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)]
            assert len(pairs) == 12
            pairs = [(t, v, top) for t, v, top in pairs if t in top and t and "\ufffd" not in t]  # (texts that
            assert pairs and all(v == top[t] for t, v, top in pairs)  # several ids share are keyed once)
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": temperature,
                "seed": 3, "logprobs": True, "top_logprobs": 3}
        content = json.loads(post(url, "/v1/chat/completions", chat)[1])["choices"][0]["logprobs"]["content"]
        same = [([t["logprob"] for t in c["top_logprobs"] if t["token"] == c["token"]], c["logprob"]) for c in content]
        assert all(v in entries for entries, v in same if entries) and any(entries for entries, _ in same)


class Recording(TowerBackend):
    """Keeps the logits of every denoiser forward."""

    def __init__(self, model):
        super().__init__(model)
        self.logits = []

    def denoise(self, *args, **kw):
        out = super().denoise(*args, **kw)
        self.logits.append(out.float())
        return out


def test_chat_top_logprobs_in_mask_diffusion_are_the_committing_forwards_best(url, model, folder):
    """`top_logprobs: 2` in mask_diffusion: each token's 2 most likely tokens under the denoiser forward that
    committed it (the mask id never counts), found here from the sampler's own Step events and logits."""
    tok = Tokenizer(folder)
    messages = [{"role": "user", "content": "hi"}]
    body = {"messages": messages, "max_tokens": 12, "logprobs": True, "top_logprobs": 2}
    content = json.loads(post(url, "/v1/chat/completions", body)[1])["choices"][0]["logprobs"]["content"]
    ids = template_ids(ChatTemplate.load(folder), tok, messages, {})[0]
    backend = Recording(model)
    want, start = {}, 0
    for ev in S.generate(backend, [ids], CFG, [2, 38]):
        if isinstance(ev, S.BlockStarted):
            start = ev.start
        elif isinstance(ev, S.Step):
            logp = backend.logits[-1][0].clone()
            logp[..., CFG.mask_token_id] = -math.inf
            logp = logp.log_softmax(-1)
            for pos in ev.committed[0]:
                values, top_ids = logp[pos].topk(2)
                want[start + pos] = list(zip(top_ids.tolist(), values.tolist(), strict=True))
    assert len(content) == len(want) > 4
    for j, c in enumerate(content):
        assert [t["token"] for t in c["top_logprobs"]] == [tok.decode([i]) for i, _ in want[j]]
        assert [t["logprob"] for t in c["top_logprobs"]] == pytest.approx([v for _, v in want[j]], abs=1e-5)


def test_sampled_tokens_come_with_the_distributions_best_too(url):
    """With temperature the chosen token need not be the most likely: its own logprob is given, and the top
    list is the distribution's best, which it is at most."""
    body = {"prompt": "hello", "max_tokens": 12, "temperature": 1.5, "seed": 3, "logprobs": 2}
    lp = json.loads(post(url, "/v1/completions", body)[1])["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["top_logprobs"]) == 12
    assert all(v <= max(top.values()) + 1e-6 for v, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True))
    assert any(tok not in top for tok, top in zip(lp["tokens"], lp["top_logprobs"], strict=True))


def full_log_softmax(model, ids):
    """The base model's next-token log-probabilities after every prefix of ids, from one plain forward (no
    chunked head): row j is the distribution of the token at position j + 1."""
    with torch.no_grad():
        logits = TowerBackend(model).ar(torch.tensor([ids]))
    return getattr(logits, "logits", logits)[0].float().log_softmax(-1)


def test_echo_with_max_tokens_0_scores_the_prompt_with_its_top_tokens(url, model, folder):
    tok = Tokenizer(folder)
    ids = tok.encode("the quick brown fox")
    out = json.loads(post(url, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2})[1])
    choice, usage = out["choices"][0], out["usage"]
    assert choice["text"] == tok.decode(ids) and usage["completion_tokens"] == 0 and usage["prompt_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([i]) for i in ids] and lp["token_logprobs"][0] is None
    want = full_log_softmax(model, ids)
    assert max(abs(lp["token_logprobs"][j] - want[j - 1, ids[j]].item()) for j in range(1, len(ids))) < 1e-4
    assert lp["top_logprobs"][0] is None
    for j in range(1, len(ids)):
        values, top = want[j - 1].topk(2)
        expected = {tok.decode([i]): v for i, v in zip(top.tolist(), values.tolist(), strict=True)}
        assert lp["top_logprobs"][j] == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_as_lm_eval_asks_for_it(url, model, folder):
    """lm-eval's local-completions loglikelihood request: context + continuation as ids, echo, max_tokens 1,
    logprobs 1, greedy; it sums token_logprobs over the continuation (dropping the one generated token) and
    checks greediness against top_logprobs. Both against the base model directly."""
    tok = Tokenizer(folder)
    context, continuation = tok.encode("hello there,"), tok.encode(" my friend")
    ids = context + continuation
    body = {"prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "mode": "ar"}
    lp = json.loads(post(url, "/v1/completions", body)[1])["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt and the one generated token
    n = len(context)
    got = sum(lp["token_logprobs"][n:-1])
    want = full_log_softmax(model, ids)
    assert got == pytest.approx(sum(want[j - 1, ids[j]].item() for j in range(n, len(ids))), abs=1e-4)
    greedy = all(max(top, key=top.get) == tok.decode([ids[j]]) for j, top in enumerate(lp["top_logprobs"][n:-1], n))
    assert greedy == all(want[j - 1].argmax().item() == ids[j] for j in range(n, len(ids)))
    generated = lp["top_logprobs"][-1]
    assert list(generated) == [lp["tokens"][-1]]  # greedy: the generated token is the most likely one
    assert generated[lp["tokens"][-1]] == pytest.approx(lp["token_logprobs"][-1], abs=1e-6)


def test_metrics_add_up_the_usage_of_the_answered_requests(folder, model):
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    with serving(engine, []) as base:
        usages = [json.loads(post(base, "/v1/completions", body)[1])["usage"]
                  for body in ({"prompt": "hello", "max_tokens": 6}, {"prompt": ["ab", "abc"], "max_tokens": 4},
                               {"prompt": "hello there", "max_tokens": 0, "echo": True})]
        with urllib.request.urlopen(base + "/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["twotower_requests_total"] == 3 and values["twotower_failed_requests_total"] == 0
    for key in ("prompt_tokens", "completion_tokens"):
        assert values[f"twotower_{key}_total"] == sum(u[key] for u in usages), key
    assert values["twotower_cached_prompt_tokens_total"] == sum(u["prompt_tokens_details"]["cached_tokens"]
                                                                for u in usages)
    assert values["twotower_batches_total"] == 3 and values["twotower_waiting_requests"] == 0
    assert values["twotower_running_requests"] == 0
    assert "# TYPE twotower_requests_total counter" in text and values["twotower_model_seconds_total"] > 0
    # latency histograms: every answered request once (the scored one has no first token nor batch to join)
    for name, count in (("request_seconds", 3), ("queue_seconds", 2), ("first_token_seconds", 2)):
        assert f"# TYPE twotower_{name} histogram" in text
        buckets = [v for k, v in values.items() if k.startswith(f"twotower_{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == values[f'twotower_{name}_bucket{{le="+Inf"}}'] == count
        assert values[f"twotower_{name}_count"] == count and values[f"twotower_{name}_sum"] >= 0
    assert values["twotower_first_token_seconds_sum"] <= values["twotower_request_seconds_sum"]



def test_histogram_counts_each_observation_under_its_bounds():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 5.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1"} 3', 'x_bucket{le="+Inf"} 4', "x_sum 5.65",
                            "x_count 4"]


def test_n_choices_are_rows_of_one_batch(url, model, folder):
    """n = 3 with sampling: three choices per prompt (index = prompt · n + choice), the sampler's rows for the
    prompts repeated n times with the request's seed; the prompt is counted once in the usage. Greedy n = 2:
    two identical choices."""
    tok = Tokenizer(folder)
    prompts = ["hello", "abc"]
    body = {"prompt": prompts, "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 4}
    out = json.loads(post(url, "/v1/completions", body)[1])
    rows = [tok.encode(p) for p in prompts for _ in range(3)]
    want = S.run(TowerBackend(model), rows, replace_cfg(max_new_tokens=8, temperature=1.0), [2, 38],
                 torch.Generator().manual_seed(4)).generations
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert [c["text"] for c in out["choices"]] == [tok.decode(g.token_ids) for g in want]
    assert len({c["text"] for c in out["choices"][:3]}) > 1  # the choices of one prompt differ
    assert out["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)
    chat = json.loads(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 6, "n": 2})[1])
    texts = [c["message"]["content"] for c in chat["choices"]]
    assert len(texts) == 2 and texts[0] == texts[1]


def test_help_names_every_request_field_that_overrides_an_option():
    """`serve --help` lists the request fields that override its options: all the sampler fields the server
    reads (top_k, n, policy and factor were missing)."""
    import re

    from typer.testing import CliRunner

    from twotower_cli.cli import get_app

    r = CliRunner().invoke(get_app(), ["serve", "--help"], terminal_width=200)
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())
    listed = re.search(r"a request's own fields \(([^)]*)\) override them", text)
    assert listed, text[:600]
    names = set(re.findall(r"[a-z_]+", listed.group(1))) - {"and"}
    assert {"max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "n", "block_size", "steps",
            "threshold", "policy", "factor", "mode"} <= names


def test_a_waiting_request_on_a_connection_past_fd_1023_is_answered(folder, model, monkeypatch):
    """A busy server's connections get descriptors past select()'s FD_SETSIZE (1024): asking whether such
    a client is gone must not fail (select.select raised ValueError, and every such request was a 500)."""
    import os
    import resource

    from twotower_cli import serve

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip("the descriptor limit is below 1200 here")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    monkeypatch.setattr(serve, "GONE_POLL_SECONDS", 0.01)
    held = []
    try:
        while True:  # the next descriptors, the server's accepted socket's among them, are past 1023
            held.append(os.open(os.devnull, os.O_RDONLY))
            if held[-1] >= 1030:
                break
        for _ in range(4):  # free only the top ones: the server's sockets get those
            os.close(held.pop())
        engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
        got = {}
        with serving(engine) as base:
            asking = threading.Thread(target=lambda: got.update(answer=post(
                base, "/v1/completions", {"prompt": "hi", "max_tokens": 2})))
            with engine.lock:  # the request waits for the model: its client is asked after
                asking.start()
                time.sleep(0.3)
            asking.join(60)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert got["answer"][0] == 200, got


def test_an_answer_to_a_client_that_left_prints_no_traceback(folder, model, monkeypatch, capsys):
    """The 503 `Engine.close` (Ctrl-C, SIGTERM) gives a request whose client has left (and was not noticed
    yet) fails to write: the server goes on quietly, without socketserver's 'Exception occurred during
    processing of request' traceback on its stderr."""
    import socket
    import struct
    import urllib.parse

    from twotower_cli import serve

    monkeypatch.setattr(serve, "GONE_POLL_SECONDS", 60)  # the client's leaving is not noticed before close
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    with serving(engine) as base:
        where = urllib.parse.urlsplit(base)
        with engine.lock:  # the request waits for the model
            client = socket.create_connection((where.hostname, where.port), timeout=30)
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 30
            while not engine.pending and time.monotonic() < deadline:
                time.sleep(0.01)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset: the server's next write fails
            time.sleep(0.2)
            closing = threading.Thread(target=engine.close)  # answers with a 503, then waits for the model
            closing.start()
            time.sleep(0.5)  # the handler writes its 503
        closing.join(60)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


# ------------------------------------------------------------------------------------------- methods

def ask_raw(url, method, path, body=None, headers=None):
    """One request of any method: (status, headers, body bytes); http.client reads no body after a HEAD."""
    import http.client
    import urllib.parse

    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "TRACE"])
@pytest.mark.parametrize("path, allow", [("/v1/completions", {"POST", "OPTIONS"}),
                                         ("/v1/chat/completions", {"POST", "OPTIONS"}),
                                         ("/v1/models", {"GET", "HEAD", "OPTIONS"}),
                                         ("/health", {"GET", "HEAD", "OPTIONS"})])
def test_a_method_a_route_does_not_take_is_a_405_with_allow(url, method, path, allow):
    """Methods other than GET and POST got http.server's HTML 501 page: now an OpenAI error object, 405, and
    the Allow header naming what the route takes (RFC 9110 §15.5.6)."""
    status, headers, body = ask_raw(url, method, path, body=b'{"prompt": "hi"}' if method != "TRACE" else None,
                                    headers={"Content-Type": "application/json"})
    assert status == 405 and headers["Content-Type"] == "application/json", (status, body)
    assert {m.strip() for m in headers["Allow"].split(",")} == allow
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and method in error["message"] and path in error["message"]


def test_get_on_a_post_route_and_post_on_a_get_route_are_405s(url):
    for method, path, allow in (("GET", "/v1/completions", "POST"), ("POST", "/v1/models", "GET")):
        status, headers, body = ask_raw(url, method, path, body=b"{}" if method == "POST" else None)
        assert status == 405 and allow in headers["Allow"] and "error" in json.loads(body), (method, path, body)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
def test_any_method_on_an_unknown_path_is_a_404_error_object(url, method):
    status, headers, body = ask_raw(url, method, "/v1/nope")
    assert status == 404 and json.loads(body)["error"]["message"] == "no route /v1/nope", body
    assert "Allow" not in headers


def test_a_method_http_has_not_is_a_501_error_object(url):
    """An unknown method (no do_ handler) and a request line http.server cannot read: its own refusals, in the
    API's error shape too."""
    import socket
    import urllib.parse

    status, headers, body = ask_raw(url, "BREW", "/v1/completions")
    assert status == 501 and headers["Content-Type"] == "application/json", body
    assert "BREW" in json.loads(body)["error"]["message"]
    where = urllib.parse.urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as s:
        s.sendall(b"GET /health now HTTP/1.1\r\n\r\n")  # a word too many
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400" and b"application/json" in head, raw
    assert json.loads(body)["error"]["message"].startswith("Bad request syntax"), raw


@pytest.mark.parametrize("path", ["/v1/completions", "/health", "/v1/models"])
def test_options_answers_the_methods_a_route_takes(url, path):
    status, headers, body = ask_raw(url, "OPTIONS", path)
    assert status == 204 and body == b""
    assert {m.strip() for m in headers["Allow"].split(",")} == (
        {"POST", "OPTIONS"} if path == "/v1/completions" else {"GET", "HEAD", "OPTIONS"})


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/metrics"])
def test_head_is_the_get_without_its_body(url, path):
    """HEAD on a GET route: the GET's status and headers (Content-Length included), no body (RFC 9110 §9.3.2).
    A raw socket, so that a body sent after the headers would be seen."""
    import socket
    import urllib.parse

    got_status, got_headers, got_body = ask_raw(url, "GET", path)
    where = urllib.parse.urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as s:
        s.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):  # the server closes the connection after its answer (as asked)
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(lines[0].split()[1]) == got_status == 200 and rest == b"", raw
    assert headers["Content-Type"] == got_headers["Content-Type"]
    if path != "/metrics":  # the metrics change between the two requests (the GET was counted)
        assert int(headers["Content-Length"]) == len(got_body)


def test_head_on_a_post_route_is_a_405_without_a_body(url):
    import socket
    import urllib.parse

    where = urllib.parse.urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as s:
        s.sendall(b"HEAD /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.split()[1] == b"405" and b"Allow: POST" in head and rest == b"", raw


def test_the_api_key_is_asked_before_a_method_is_judged(folder, model):
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    with serving(engine, api_key="s3cret") as base:
        assert ask_raw(base, "PUT", "/v1/completions")[0] == 401
        assert ask_raw(base, "PUT", "/v1/completions", headers={"Authorization": "Bearer s3cret"})[0] == 405
        assert ask_raw(base, "HEAD", "/health")[0] == 200
        assert ask_raw(base, "OPTIONS", "*")[0] == 204  # the server's methods, like /health, need no key


# ------------------------------------------------------------------------------------------- connections

def connect(url):
    """An http.client connection to the server (HTTP/1.1: it keeps the connection between requests)."""
    import http.client
    import urllib.parse

    where = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(where.hostname, where.port, timeout=60)


def raw_socket(url):
    import socket
    import urllib.parse

    where = urllib.parse.urlsplit(url)
    return socket.create_connection((where.hostname, where.port), timeout=60)


def read_all(s):
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    return raw


def parse_response(raw):
    """(status, headers, body) of the answer in `raw` bytes, as http.client reads it (interim 1xx answers
    skipped, chunks joined)."""
    import http.client
    import io

    class Received:
        def makefile(self, *args, **kwargs):
            return io.BytesIO(raw)

    r = http.client.HTTPResponse(Received())
    r.begin()
    return r.status, r.headers, r.read()


@pytest.mark.parametrize("chunked", [False, True])
def test_an_error_reads_the_body_first_and_the_connection_serves_the_next_requests(url, model, folder, chunked):
    """A 404 or 405 to a request with a body: the body is read (and dropped) before the answer, so the client,
    which sends all of it before it reads, gets the error object rather than a broken pipe; and the connection
    stays open (HTTP/1.1): a stream and a whole reply follow on the same socket. The body with a
    Content-Length, or in chunks (which were not read at all: the request was a 400 'not a JSON object')."""
    tok = Tokenizer(folder)
    want = tok.decode(reference(model, tok.encode("hello there")).token_ids)
    conn = connect(url)

    def ask(method, path, body):
        data = json.dumps(body).encode()
        conn.request(method, path, body=iter([data[:7], data[7:]]) if chunked else data,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.headers, r.read()

    big = {"prompt": "x" * (4 << 20)}  # more than the sockets' buffers hold
    status, headers, text = ask("POST", "/v1/nope", big)
    assert status == 404 and json.loads(text)["error"]["message"] == "no route /v1/nope", text
    sock = conn.sock
    status, headers, text = ask("PUT", "/v1/completions", big)
    assert status == 405 and headers["Allow"] == "POST, OPTIONS", text
    status, headers, text = ask("POST", "/v1/completions", {"prompt": "hello there", "max_tokens": 12, "stream": True})
    chunks, done = events(text.decode())
    assert status == 200 and done and "".join(c["choices"][0]["text"] for c in chunks) == want
    status, headers, text = ask("POST", "/v1/completions", {"prompt": "hello there", "max_tokens": 12})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == want, text
    assert conn.sock is sock and "Connection" not in headers  # one connection throughout
    conn.close()


def test_a_401_reads_the_body_first_and_keeps_the_connection(folder, model):
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    with serving(engine, api_key="s3cret") as base:
        conn = connect(base)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x" * (4 << 20)}).encode())
        r = conn.getresponse()
        assert r.status == 401 and json.loads(r.read())["error"]["code"] == "invalid_api_key"
        sock = conn.sock
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hi", "max_tokens": 2}).encode(),
                     headers={"Authorization": "Bearer s3cret"})
        r = conn.getresponse()
        assert r.status == 200 and len(json.loads(r.read())["choices"]) == 1 and conn.sock is sock
        conn.close()


@pytest.mark.parametrize("path, status", [("/v1/completions", 413), ("/v1/nope", 404)])
def test_a_body_too_large_to_read_still_gets_its_answer_and_the_connection_closes(url, monkeypatch, path, status):
    """A body over MAX_BODY_BYTES is not read: the answer says `Connection: close`, and the server reads and
    drops what the client still sends for a moment before it closes, so that a client that sends all of its
    body before it reads (http.client) gets the answer rather than a broken pipe."""
    from twotower_cli import serve

    monkeypatch.setattr(serve, "MAX_BODY_BYTES", 1000)
    conn = connect(url)
    conn.request("POST", path, body=b"x" * (8 << 20), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == status and r.headers["Connection"] == "close", r.status
    assert "error" in json.loads(r.read())
    conn.close()


def test_expect_100_continue_is_answered_when_the_body_is_wanted_and_a_refusal_comes_without_it(url, model, folder):
    """`Expect: 100-continue` (curl sends it with bodies over 1 MiB): a 100 once the server reads the body,
    then the answer (it was never sent: curl waits a second for it); a request refused on its headers is
    answered at once, without the body, and its connection closes (the client may send the body or not)."""
    tok = Tokenizer(folder)
    body = json.dumps({"prompt": "hello there", "max_tokens": 12}).encode()
    head = (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n")
    with raw_socket(url) as s:
        s.sendall(head % (b"/v1/completions", len(body)))
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += s.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        s.sendall(body)
        status, _, text = parse_response(read_all(s))
    assert status == 200 and json.loads(text)["choices"][0]["text"] == tok.decode(
        reference(model, tok.encode("hello there")).token_ids)
    with raw_socket(url) as s:
        s.sendall(head % (b"/v1/nope", len(body)))
        raw = read_all(s)
    status, headers, text = parse_response(raw)
    assert raw.startswith(b"HTTP/1.1 404") and headers["Connection"] == "close" and "error" in json.loads(text), raw


def test_options_star_names_the_servers_methods_and_an_absolute_url_is_its_path(url):
    """`OPTIONS *` asks about the server as a whole (RFC 9110 §9.3.7): a 204 with every method it takes (it was
    a 404). A request target that is a whole URL (the absolute-form, RFC 9112 §3.2.2, as sent to a proxy) is
    its path (it was a 404)."""
    status, headers, body = ask_raw(url, "OPTIONS", "*")
    assert status == 204 and body == b"", (status, body)
    assert {m.strip() for m in headers["Allow"].split(",")} == {"GET", "HEAD", "POST", "OPTIONS"}
    assert ask_raw(url, "GET", "*")[0] == 400
    status, _, body = ask_raw(url, "GET", url + "/v1/models?x=1")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny-test", body


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_half_closes_after_its_request_gets_its_answer(folder, model, monkeypatch, stream):
    """A client that shuts its socket for writing once its request is sent (nc -N, some HTTP clients) still
    reads: it was taken for gone, and its request cancelled without an answer. The server now sends what the
    client must read past (an interim 100; in a stream an SSE comment) and takes it for gone only when that
    brings back a reset (a client that closed: `test_a_client_that_leaves_before_its_answer_frees_the_model`).
    The answer is the sampler's."""
    import socket

    from twotower_cli import serve

    monkeypatch.setattr(serve, "GONE_POLL_SECONDS", 0.01)
    tok = Tokenizer(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test")
    body = json.dumps({"prompt": "hello there", "max_tokens": 12, "stream": stream}).encode()
    with serving(engine) as base, raw_socket(base) as s:
        with engine.lock:  # the request waits for the model, its client asked after again and again
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            s.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 30
            while not engine.pending and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
        status, _, text = parse_response(read_all(s))  # the server closes once it reads the end of stream
    want = tok.decode(reference(model, tok.encode("hello there")).token_ids)
    assert status == 200, text
    if stream:
        chunks, done = events(text.decode())
        assert done and "".join(c["choices"][0]["text"] for c in chunks) == want
    else:
        assert json.loads(text)["choices"][0]["text"] == want


def test_idle_connections_close_after_a_while_and_when_the_server_closes(folder, model, monkeypatch):
    """A connection kept open between requests is closed by the server after KEEP_ALIVE_SECONDS without one,
    and at once by `server_close` (which does not wait for it as for a request being answered)."""
    from twotower_cli import serve

    monkeypatch.setattr(serve, "KEEP_ALIVE_SECONDS", 0.2)
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    with serving(engine) as base:
        conn = connect(base)
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b'{"status": "ok"}'
        assert conn.sock.recv(1) == b""  # the server closed it
        conn.close()
    monkeypatch.setattr(serve, "KEEP_ALIVE_SECONDS", 600)
    server = own_server(engine)
    conn = connect(serve.base_url(server))
    conn.request("GET", "/health")
    assert conn.getresponse().read() == b'{"status": "ok"}'
    server.shutdown()
    server.server_close()
    assert conn.sock.recv(1) == b"" and not any(t.is_alive() for t in server.handlers)
    conn.close()
    engine.close()


@pytest.mark.parametrize("body, needle", [
    (b"5\r\nabc", "malformed"),  # the chunk ends early: the client closes
    (b"zz\r\nabc\r\n0\r\n\r\n", "malformed"),
])
def test_a_malformed_chunked_body_is_a_400_and_closes_the_connection(url, body, needle):
    with raw_socket(url) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        if body.endswith(b"abc"):
            import socket

            s.shutdown(socket.SHUT_WR)
        status, headers, text = parse_response(read_all(s))
    assert status == 400 and needle in json.loads(text)["error"]["message"] and headers["Connection"] == "close"


@pytest.mark.parametrize("headers, status, needle", [
    ("Transfer-Encoding: gzip\r\n", 501, "transfer coding 'gzip' is not supported"),
    ("Content-Length: 5\r\nContent-Length: 6\r\n", 400, "Content-Length headers that disagree"),
])
def test_a_body_whose_end_cannot_be_found_is_refused_and_closes_the_connection(url, headers, status, needle):
    with raw_socket(url) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + headers.encode() + b"\r\n{}")
        answer = parse_response(read_all(s))
    assert answer[0] == status and needle in json.loads(answer[2])["error"]["message"], answer
    assert answer[1]["Connection"] == "close"


# ------------------------------------------------------------------------------------------- context length

SHORT = 40  # max_position_embeddings of the `short` model


@pytest.fixture(scope="module")
def short(folder, tmp_path_factory):
    """The test model with a context of SHORT tokens stated in its config.json (max_position_embeddings)."""
    short = shutil.copytree(folder, tmp_path_factory.mktemp("short") / "tt")
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = SHORT
    (short / "config.json").write_text(json.dumps(config))
    return short


@pytest.fixture(scope="module")
def short_url(short):
    """A server over `short` whose requests default to 20 tokens."""
    engine = Engine(TowerBackend(load_model(short, need_denoiser=True).twotower), Tokenizer(short), [2, 38],
                    replace_cfg(max_new_tokens=20), "tiny-test", ChatTemplate.load(short))
    with serving(engine) as base:
        yield base


def chat_ids(folder, messages):
    return template_ids(ChatTemplate.load(folder), Tokenizer(folder), messages, {})[0]


TALK = [{"role": "user", "content": "hi"}]  # 38 ids as the test template renders it
LONG_TALK = [{"role": "user", "content": "tell me the whole story"}]  # 59


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/completions", {"prompt": "hello there", "max_tokens": 30},
     "asks for 41: 11 in the prompt and 30 to complete; set 'max_tokens' to 29 or less"),
    ("/v1/completions", {"prompt": "hello there", "max_completion_tokens": 30},
     "set 'max_completion_tokens' to 29 or less"),
    ("/v1/completions", {"prompt": "hello there", "max_tokens": 10 ** 12}, f"asks for {10 ** 12 + 11}:"),
    ("/v1/completions", {"prompt": ["hi", "hello there"], "max_tokens": 30, "n": 2}, "11 in the longest prompt"),
    ("/v1/completions", {"prompt": "hello there", "max_tokens": 30, "echo": True, "logprobs": 1}, "asks for 41"),
    ("/v1/completions", {"prompt": [5] * (SHORT + 1), "max_tokens": 0, "echo": True}, "the prompt alone is 41 tokens"),
    ("/v1/completions", {"prompt": [5] * SHORT}, "alone is 40 tokens, which leaves no room for a completion"),
    ("/v1/chat/completions", {"messages": TALK, "max_tokens": 3, "n": 2}, "asks for 41: 38 in the conversation"),
    ("/v1/chat/completions", {"messages": LONG_TALK}, "the conversation alone is 59 tokens; shorten the conversation"),
])
def test_a_request_beyond_the_context_length_is_a_400_naming_it(short_url, path, body, needle):
    """The longest prompt and max_tokens together beyond max_position_embeddings (40 here): a 400 with
    OpenAI's code for it, naming the limit, the counts and what would fit; n, echo and scoring alike."""
    status, text = post(short_url, path, body)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(f"this model's maximum context length is {SHORT} tokens"), error
    assert needle in error["message"], error
    assert post(short_url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200  # the server lives on


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_negative_max_tokens_is_a_400_naming_the_request_field(url, field):
    status, text = post(url, "/v1/completions", {"prompt": "hello there", field: -5})
    assert status == 400, text
    assert json.loads(text)["error"]["message"] == f"'{field}' -5 must be 0 or more", text


def test_a_config_without_max_position_embeddings_bounds_requests_at_4096(url):
    """The test model's config.json has no max_position_embeddings: 4096, as transformers reads it, so a
    request for 10^12 tokens is refused at once instead of holding the model."""
    status, text = post(url, "/v1/completions", {"prompt": "hello there", "max_tokens": 10 ** 12})
    error = json.loads(text)["error"]
    assert status == 400 and error["message"].startswith("this model's maximum context length is 4096 tokens"), text
    assert "set 'max_tokens' to 4085 or less" in error["message"], text


def test_a_request_that_fills_the_context_exactly_is_answered(short_url, model, folder):
    """Prompt + max_tokens == the context length is allowed (the bound is inclusive), as is scoring a prompt
    of the context length."""
    tok = Tokenizer(folder)
    out = json.loads(post(short_url, "/v1/completions", {"prompt": "hello there", "max_tokens": SHORT - 11})[1])
    want = reference(model, tok.encode("hello there"), replace_cfg(max_new_tokens=SHORT - 11))
    assert out["choices"][0]["text"] == tok.decode(want.token_ids)
    ids = tok.encode("the quick brown fox jumps over the lazy d")[:SHORT]
    assert len(ids) == SHORT
    scored = post(short_url, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert scored[0] == 200 and json.loads(scored[1])["usage"]["prompt_tokens"] == SHORT
    with urllib.request.urlopen(short_url + "/v1/models") as r:  # the limit a client can read beforehand
        assert json.load(r)["data"][0]["max_model_len"] == SHORT


def test_a_request_without_max_tokens_gets_the_default_cut_to_what_fits(short_url, model, folder):
    """No max_tokens: the server's default (20 here) where it fits, else what is left of the context, as vLLM
    does, not a 400. Each prompt of a request gets its own cut, as vLLM's: a short prompt beside a long one
    keeps the default (all of them got the longest's cut); n and echo do not change it."""
    tok = Tokenizer(folder)
    short_prompt, long_prompt = "hi", "the quick brown fox jumps"  # room for 38 and for 15
    assert len(tok.encode(long_prompt)) == 25
    out = json.loads(post(short_url, "/v1/completions", {"prompt": [short_prompt, long_prompt], "n": 2,
                                                         "echo": True})[1])
    want = [reference(model, tok.encode(p), replace_cfg(max_new_tokens=cut))
            for p, cut in ((short_prompt, 20), (long_prompt, 15))]
    assert all(w.finish_reason == "length" for w in want)  # no end id first: the bound is what ends them
    assert [c["text"] for c in out["choices"]] == [p + tok.decode(w.token_ids) for p, w in
                                                   zip((short_prompt, long_prompt), want, strict=True) for _ in range(2)]
    assert [c["finish_reason"] for c in out["choices"]] == ["length"] * 4
    assert out["usage"]["completion_tokens"] == 2 * 20 + 2 * 15
    alone = json.loads(post(short_url, "/v1/completions", {"prompt": short_prompt})[1])
    assert alone["usage"]["completion_tokens"] == 20  # the default, where it fits
    ids = chat_ids(folder, TALK)
    chat = json.loads(post(short_url, "/v1/chat/completions", {"messages": TALK})[1])
    want = reference(model, ids, replace_cfg(max_new_tokens=min(20, SHORT - len(ids))))
    assert SHORT - len(ids) < 20 and chat["choices"][0]["message"]["content"] == tok.decode(want.token_ids)


def test_cli_serve_max_model_len_defaults_to_the_checkpoints_and_warns_beyond_it(short, folder, monkeypatch):
    from typer.testing import CliRunner

    import twotower_cli.serve
    from twotower_cli.cli import get_app

    engines = []

    def fake_make_server(engine, host, port, log=None, api_key=None, allowed_origins=()):
        engines.append(engine)
        return StoppedServer()

    monkeypatch.setattr(twotower_cli.serve, "make_server", fake_make_server)
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(short)], terminal_width=200)
    assert r.exit_code == 0 and "Warning" not in r.stderr and f"context {SHORT} tokens" in r.stderr, r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(short), "--max-model-len", "16"])
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(short), "--max-model-len", "100"], terminal_width=200)
    assert r.exit_code == 0 and f"Warning: --max-model-len 100 is beyond the {SHORT} tokens" in r.stderr, r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--max-model-len", "100000"])
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.output  # no value stated: nothing to warn of
    assert [e.max_model_len for e in engines] == [SHORT, 16, 100, 100000]
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(short), "--max-model-len", "0"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: max model len 0 must be at least 1"), r.output


def test_closing_the_server_does_not_wait_for_ever_for_a_client_that_sends_nothing(folder, model, monkeypatch):
    """`server_close` waits for the requests being handled, but only so long (serve.CLOSE_SECONDS): a client
    that opened a connection and never finished its request does not keep the server from stopping."""
    import socket
    import urllib.parse

    from twotower_cli import serve

    monkeypatch.setattr(serve, "CLOSE_SECONDS", 0.2)
    monkeypatch.setattr(serve, "REQUEST_READ_SECONDS", 600)  # it is still stuck when the server closes
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    server = own_server(engine)
    base = serve.base_url(server)
    where = urllib.parse.urlsplit(base)
    with socket.create_connection((where.hostname, where.port), timeout=30) as stuck:
        stuck.sendall(b"POST /v1/completions HTTP/1.1\r\n")  # and nothing more
        with urllib.request.urlopen(base + "/health", timeout=30) as r:  # accepted after the stuck one
            assert r.status == 200
        server.shutdown()
        closing = threading.Thread(target=server.server_close)
        closing.start()
        closing.join(60)
        assert not closing.is_alive()
        assert sum(t.is_alive() for t in server.handlers) == 1  # the stuck one, left behind (for the
    engine.close()  # REQUEST_READ_SECONDS it may take: test_a_request_that_stalls_is_a_408_and_frees_its_thread)


# ------------------------------------------------------------------------------------- stalls and timeouts

def _until(condition, seconds=30.0):
    """Whether `condition()` turns true within `seconds` (asked every 20 ms): a bound for what must happen,
    not a measurement."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def own_server(engine, **options):
    """A started `make_server` (not `in_background`: the test reads its `handlers`)."""
    from twotower_cli import serve

    server = serve.make_server(engine, port=0, **options)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.mark.parametrize("sent", [
    b"POST /v1/compl",  # inside the request line
    b"POST /v1/completions HTTP/1.1\r\n",  # before the headers
    b"POST /v1/completions HTTP/1.1\r\nContent-Type: appl",  # inside them
    b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"prompt\": ",  # inside the body
    b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"pro",  # inside a chunk
    b"GET /v1/nope HTTP/1.1\r\nContent-Length: 10\r\n\r\nab",  # the body of a request refused (a 404)
])
def test_a_request_that_stalls_is_a_408_and_frees_its_thread(folder, model, monkeypatch, sent):
    """A client that stops sending mid-request held its connection's thread for ever (there was no timeout
    once the request's first byte had come): now, after REQUEST_READ_SECONDS without a byte, it is answered
    with a 408 (an OpenAI error object, `Connection: close`), the connection closes and the thread ends; the
    server serves the next client. A 404 whose body stalls keeps its 404 and closes the connection."""
    import urllib.parse

    from twotower_cli import serve

    monkeypatch.setattr(serve, "REQUEST_READ_SECONDS", 0.3)
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    server = own_server(engine)
    base = serve.base_url(server)
    where = urllib.parse.urlsplit(base)
    import socket

    with socket.create_connection((where.hostname, where.port), timeout=20) as stuck:
        stuck.sendall(sent)  # and nothing more
        status, headers, body = parse_response(read_all(stuck))  # the server closes: read_all ends
    error = json.loads(body)["error"]
    if sent.startswith(b"GET"):
        assert status == 404 and "no route" in error["message"], body
    else:
        assert status == 408 and "did not come in time" in error["message"], body
        assert error["type"] == "invalid_request_error"
    assert headers["Connection"] == "close"
    assert _until(lambda: not any(t.is_alive() for t in server.handlers))
    assert post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
    server.shutdown()
    server.server_close()
    engine.close()


@pytest.mark.parametrize("stream", [False, True])
def test_the_read_timeout_does_not_bound_the_models_time_nor_the_wait_between_requests(folder, model, monkeypatch,
                                                                                      stream):
    """REQUEST_READ_SECONDS is for reading the request only: a request whose answer takes the model longer
    (here: the model held for 1 s, with a read timeout of 0.1 s) gets its full answer, and a kept connection
    then waits KEEP_ALIVE_SECONDS, not REQUEST_READ_SECONDS, for its next request."""
    from twotower_cli import serve

    monkeypatch.setattr(serve, "REQUEST_READ_SECONDS", 0.1)
    tok = Tokenizer(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test")
    want = tok.decode(reference(model, tok.encode("hello there"), replace_cfg(max_new_tokens=6)).token_ids)
    with serving(engine) as base:
        conn = connect(base)
        with engine.lock:  # the model is busy for a second
            conn.request("POST", "/v1/completions", json.dumps(
                {"prompt": "hello there", "max_tokens": 6, "stream": stream}), {"Content-Type": "application/json"})
            time.sleep(1.0)
        answer = conn.getresponse()
        text = answer.read().decode()
        assert answer.status == 200, text
        got = ("".join(e["choices"][0]["text"] for e in events(text)[0]) if stream
               else json.loads(text)["choices"][0]["text"])
        assert got == want
        time.sleep(0.5)  # longer than REQUEST_READ_SECONDS between requests: the connection is still open
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b'{"status": "ok"}'
        conn.close()
    engine.close()


def test_a_stream_its_client_stops_reading_is_closed_after_send_seconds(folder, model, monkeypatch):
    """A client that stops reading its stream held its thread for ever, blocked in a write once the socket's
    buffers were full: now a write that waits SEND_SECONDS ends the stream (its rows leave the batch) and the
    connection. The buffers are made small (the server's, inherited by accepted sockets from the listening
    one; the client's) so that a few kB fill them."""
    import socket
    import urllib.parse

    from twotower_cli import serve

    monkeypatch.setattr(serve, "SEND_SECONDS", 0.3)
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    server = own_server(engine)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    where = urllib.parse.urlsplit(serve.base_url(server))
    body = json.dumps({"prompt": "hello there", "max_tokens": 400, "n": 16, "stream": True}).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((where.hostname, where.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert _until(lambda: engine.counts["batches_total"] and server.handlers)  # the model has begun it
        # the client reads nothing; its connection's thread must end all the same
        assert _until(lambda: not any(t.is_alive() for t in server.handlers), 60)
    assert post(serve.base_url(server), "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
    server.shutdown()
    server.server_close()
    engine.close()


# ------------------------------------------------------------------------------------------------ CORS

def ask(base, method, path, headers=None, body=None):
    """(status, headers, body) of one request on its own connection."""
    conn = connect(base)
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, r.headers, r.read()
    conn.close()
    return out


PAGE = "http://localhost:3000"


def test_without_allowed_origins_no_cors_header_is_sent(url):
    """The default: no Access-Control-* header on any answer, a preflight included (a browser then keeps
    other origins' pages from calling the server)."""
    preflight = {"Origin": PAGE, "Access-Control-Request-Method": "POST"}
    for method, path, headers in [("OPTIONS", "/v1/chat/completions", preflight), ("GET", "/v1/models", {"Origin": PAGE}),
                                  ("GET", "/v1/nope", {"Origin": PAGE})]:
        _, headers_out, _ = ask(url, method, path, headers)
        assert not [h for h in headers_out if h.lower().startswith("access-control-")], (path, headers_out)


def test_an_allowed_origin_gets_cors_headers_on_every_answer_and_a_preflight_without_the_key(folder, model):
    """--allowed-origin: a browser's preflight (OPTIONS with Origin and Access-Control-Request-Method, sent
    without the API key) gets a 204 naming the origin, the route's methods, Authorization and Content-Type
    (and the headers it asked for) and a Max-Age; every answer to that origin, the 401 without the key, the
    404, a completion and a stream, names it, with `Vary: Origin`. Another origin is named by none."""
    from twotower_cli import serve

    tok = Tokenizer(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test")
    key = {"Authorization": "Bearer k"}
    with serving(engine, api_key="k", allowed_origins=[PAGE, "https://app.example"]) as base:
        status, h, _ = ask(base, "OPTIONS", "/v1/chat/completions", {
            "Origin": PAGE, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert status == 204 and h["Access-Control-Allow-Origin"] == PAGE and h["Vary"] == "Origin"
        assert h["Access-Control-Allow-Methods"] == "POST"
        allowed = {x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "x-stainless-os"} <= allowed
        assert int(h["Access-Control-Max-Age"]) == serve.CORS_MAX_AGE
        status, h, _ = ask(base, "OPTIONS", "/v1/models", {"Origin": PAGE, "Access-Control-Request-Method": "GET"})
        assert status == 204 and h["Access-Control-Allow-Methods"] == "GET, HEAD"
        assert ask(base, "OPTIONS", "/v1/models")[0] == 401  # a plain OPTIONS still needs the key
        want = tok.decode(reference(model, tok.encode("hi"), replace_cfg(max_new_tokens=4)).token_ids)
        for method, path, headers, body, code in [
                ("POST", "/v1/completions", {}, {"prompt": "hi", "max_tokens": 4}, 401),
                ("GET", "/v1/nope", key, None, 404),
                ("POST", "/v1/completions", key, {"prompt": "hi", "max_tokens": 4}, 200),
                ("POST", "/v1/completions", key, {"prompt": "hi", "max_tokens": 4, "stream": True}, 200)]:
            status, h, raw = ask(base, method, path, {**headers, "Origin": PAGE}, body)
            assert status == code and h["Access-Control-Allow-Origin"] == PAGE and h["Vary"] == "Origin", (path, h)
            if code == 200:
                text = ("".join(e["choices"][0]["text"] for e in events(raw.decode())[0]) if body.get("stream")
                        else json.loads(raw)["choices"][0]["text"])
                assert text == want
        status, h, _ = ask(base, "GET", "/v1/models", {**key, "Origin": "http://evil.example"})
        assert status == 200 and "Access-Control-Allow-Origin" not in h and h["Vary"] == "Origin"
        status, h, _ = ask(base, "OPTIONS", "/v1/completions", {
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in h
    with serving(engine, allowed_origins=["*"]) as base:
        status, h, _ = ask(base, "GET", "/v1/models", {"Origin": "http://anywhere.example"})
        assert status == 200 and h["Access-Control-Allow-Origin"] == "*" and "Vary" not in h
    engine.close()


def test_cli_serve_takes_allowed_origins_and_refuses_one_that_is_no_origin(folder, monkeypatch):
    from typer.testing import CliRunner

    import twotower_cli.serve
    from twotower_cli.cli import get_app

    given = []
    monkeypatch.setattr(twotower_cli.serve, "make_server",
                        lambda engine, *a, allowed_origins=(), **k: given.append(allowed_origins) or StoppedServer())
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--allowed-origin", PAGE,
                                       "--allowed-origin", "*"])
    assert r.exit_code == 0 and given == [[PAGE, "*"]], r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder)])
    assert r.exit_code == 0 and given[-1] == [], r.output
    r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), "--allowed-origin", PAGE + "/"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: --allowed-origin '{PAGE}/'"), r.output
    assert f"--allowed-origin {PAGE})" in lines[0]
    assert len(given) == 2  # refused before the model was loaded


# ------------------------------------------------------------------------------------------ route aliases

@pytest.mark.parametrize("alias, route, body", [
    ("/models", "/v1/models", None),
    ("/completions", "/v1/completions", {"prompt": "hi", "max_tokens": 4}),
    ("/chat/completions", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
])
def test_routes_without_v1_answer_as_the_v1_routes(url, alias, route, body):
    """An OpenAI client given the server's address without /v1 as base_url asks for /chat/completions etc.
    (llama.cpp's server answers them too): they were 404s, they answer as the /v1 routes."""
    method = "GET" if body is None else "POST"
    got, want = ask(url, method, alias, body=body), ask(url, method, route, body=body)
    assert got[0] == want[0] == 200
    strip = ("id", "created")
    a, b = json.loads(got[2]), json.loads(want[2])
    if body is not None:
        a, b = ({k: v for k, v in x.items() if k not in strip} for x in (a, b))
        for x in (a, b):
            x["usage"] = {k: v for k, v in x["usage"].items() if k not in ("seconds", "prompt_tokens_details")}
    assert a == b
    assert ask(url, "OPTIONS", alias)[1]["Allow"] == ask(url, "OPTIONS", route)[1]["Allow"]


# ---------------------------------------------------------------------------------- unused sampling options

def test_cli_serve_warns_of_sampling_options_its_mode_or_policy_never_reads(folder, monkeypatch):
    """As generate, chat and bench: one Warning line for each option given that the server's mode or policy
    does not read (only those given); where a request may still choose the mode or policy that reads it, the
    line says so. No warning for options that are read, nor for defaults."""
    from typer.testing import CliRunner

    import twotower_cli.serve
    from twotower_cli.cli import get_app

    monkeypatch.setattr(twotower_cli.serve, "make_server", lambda *a, **k: StoppedServer())

    def warnings(*args):
        r = CliRunner().invoke(get_app(), ["serve", "--model", str(folder), *args])
        assert r.exit_code == 0, r.output
        return [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]

    assert warnings() == [] and warnings("--block", "4", "--threshold", "0.5") == []
    assert warnings("--mode", "mask_diffusion", "--policy", "threshold", "--factor", "2") == [
        "Warning: --factor: no effect with --policy threshold (unless a request sets policy factor) "
        "(hint: leave it out, or use --policy factor)"]
    got = warnings("--mode", "ar", "--steps", "2", "--threshold", "0.5")  # no denoiser: no request can use them
    assert got == ["Warning: --steps: no effect in --mode ar, which commits one token per step "
                   "(hint: leave it out, or use --mode mask_diffusion)",
                   "Warning: --threshold: no effect in --mode ar, which commits one token per step "
                   "(hint: leave it out, or use --mode mask_diffusion)"], got
    got = warnings("--mode", "mock_ar", "--block", "4")
    assert got == ["Warning: --block: no effect in --mode mock_ar, which commits one token per step (unless a "
                   "request sets mode mask_diffusion) (hint: leave it out, or use --mode mask_diffusion)"], got


# ------------------------------------------------------------------------------ fields the server does not honour

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
PROMPT = {"prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {**PROMPT, "logit_bias": {"5": -100}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 100}}, "logit_bias"),
    ("/v1/completions", {**PROMPT, "presence_penalty": 1.5}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": -0.5}, "frequency_penalty"),
    ("/v1/completions", {**PROMPT, "suffix": " the end"}, "suffix"),
    ("/v1/completions", {**PROMPT, "best_of": 3}, "best_of"),
    ("/v1/completions", {**PROMPT, "n": 2, "best_of": 4}, "best_of"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {**CHAT, "function_call": {"name": "f"}}, "function_call"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {**CHAT, "echo": True}, "echo"),  # vLLM's chat echo; completions' is honoured
    ("/v1/completions", {**PROMPT, "repetition_penalty": 1.3}, "repetition_penalty"),
    ("/v1/completions", {**PROMPT, "min_p": 0.1}, "min_p"),
    ("/v1/completions", {**PROMPT, "ignore_eos": True}, "ignore_eos"),
    ("/v1/chat/completions", {**CHAT, "add_generation_prompt": False}, "add_generation_prompt"),
    ("/v1/completions", {**PROMPT, "presence_penalty": True}, "presence_penalty"),  # true is not 0
])
def test_a_field_that_would_change_the_output_and_is_not_honoured_is_a_400_naming_it(url, path, body, field):
    """These fields were read by no one: the answer came as if they had not been sent (a JSON-mode request
    got free text, a logit_bias banning a token got it). Now each is a 400 naming the field, with OpenAI's
    code for it, and the server goes on."""
    status, text = post(url, path, body)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert error["message"].startswith(f"'{field}'") and "not supported" in error["message"], error
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_parameter"
    assert post(url, "/v1/completions", PROMPT)[0] == 200


@pytest.mark.parametrize("path, plain, neutral", [
    ("/v1/completions", PROMPT, {"logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "suffix": "",
                                 "best_of": 1, "user": "u-1", "seed": 3, "min_p": 0, "repetition_penalty": 1.0,
                                 "stream_options": None, "model": "anything", "echo": False}),
    ("/v1/chat/completions", CHAT, {"logit_bias": None, "response_format": {"type": "text"}, "tools": [],
                                    "tool_choice": "none", "parallel_tool_calls": False, "user": "u-1",
                                    "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "n": 1,
                                    "modalities": ["text"], "echo": False, "function_call": "auto",
                                    "add_generation_prompt": True}),
])
def test_neutral_values_and_fields_that_do_not_change_the_output_are_accepted(url, path, plain, neutral):
    """Clients send some of these fields with their neutral values (LangChain's penalties 0 and logit_bias
    {}, lm-eval's seed) or fields that change nothing of the output (user, metadata, store): those requests
    are answered, as without them."""
    def content(text):
        choice = json.loads(text)["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]

    status, text = post(url, path, {**plain, **neutral})
    assert status == 200, text
    assert content(text) == content(post(url, path, plain)[1])


# ------------------------------------------------------------------------------ a request that trickles in

@pytest.mark.parametrize("head, limits", [
    (b"POST /v1/completions HTTP/1.1\r\nX-Pad: " + b"a" * 1500, {"REQUEST_HEAD_SECONDS": 0.5}),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 1500\r\n\r\n" + b" " * 1500,
     {"REQUEST_BODY_SECONDS": 0.5, "BODY_MIN_RATE": 1000}),
])
def test_a_request_that_trickles_in_is_a_408_at_its_deadline_and_frees_its_thread(folder, model, monkeypatch,
                                                                                   head, limits):
    """A client that sends its request a byte at a time, each well within REQUEST_READ_SECONDS of the last,
    held its connection's thread for as long as it kept trickling (the timeout was per read). Now the request
    line and headers must come within REQUEST_HEAD_SECONDS, and the body within REQUEST_BODY_SECONDS plus a
    second per BODY_MIN_RATE bytes: the trickling client gets a 408 while it still sends, its connection
    closes and its thread ends. (Limits made small; a real socket, a byte every 20 ms.)"""
    import select
    import socket
    import urllib.parse

    from twotower_cli import serve

    for name, value in limits.items():
        monkeypatch.setattr(serve, name, value, raising=False)  # (the old code had none of them)
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    server = own_server(engine)
    where = urllib.parse.urlsplit(serve.base_url(server))
    answered = b""
    with socket.create_connection((where.hostname, where.port), timeout=20) as client:
        for i in range(len(head)):  # at most 30 s of trickling: far past the deadline
            if select.select([client], [], [], 0)[0]:
                answered = read_all(client)
                break
            try:
                client.sendall(head[i:i + 1])
            except OSError:  # closed by the server: its answer is waiting to be read
                answered = read_all(client)
                break
            time.sleep(0.02)
    assert answered, "the server never answered the trickling client"
    status, headers, body = parse_response(answered)
    error = json.loads(body)["error"]
    assert status == 408 and "did not come in time: it came too slowly" in error["message"], body
    assert headers["Connection"] == "close"
    assert _until(lambda: not any(t.is_alive() for t in server.handlers))
    assert post(serve.base_url(server), "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
    server.shutdown()
    server.server_close()
    engine.close()


def test_a_large_body_over_a_slow_link_still_comes(folder, model, monkeypatch):
    """The body's deadline moves a second later for every BODY_MIN_RATE bytes that come: a body sent at a
    steady rate above it is read whole, however long that takes past REQUEST_BODY_SECONDS."""
    import socket
    import urllib.parse

    from twotower_cli import serve

    monkeypatch.setattr(serve, "REQUEST_BODY_SECONDS", 0.3)
    monkeypatch.setattr(serve, "BODY_MIN_RATE", 2000)
    tok = Tokenizer(folder)
    engine = Engine(TowerBackend(model), tok, [2, 38], CFG, "tiny-test")
    server = own_server(engine)
    where = urllib.parse.urlsplit(serve.base_url(server))
    body = json.dumps({"prompt": "hi", "max_tokens": 4, "user": "x" * 4000}).encode()
    with socket.create_connection((where.hostname, where.port), timeout=20) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        for at in range(0, len(body), 400):  # 400 bytes every 50 ms (8000 bytes/s): past 0.3 s in all
            client.sendall(body[at:at + 400])
            time.sleep(0.05)
        status, _, answer = parse_response(read_all(client))
    want = tok.decode(reference(model, tok.encode("hi"), replace_cfg(max_new_tokens=4)).token_ids)
    assert status == 200 and json.loads(answer)["choices"][0]["text"] == want, answer
    server.shutdown()
    server.server_close()
    engine.close()


# ------------------------------------------------------------------------------ a page of another origin

@pytest.mark.parametrize("content_type", ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json"])
def test_a_page_of_another_origin_cannot_make_the_model_run(folder, model, content_type):
    """A browser page may POST a "simple" request (a text/plain, form or multipart body; `fetch` with mode
    no-cors) to any origin without a preflight; it cannot read the answer, but the model ran for it (a page
    could keep a GPU busy, or have a local server generate, as a CSRF). The browser sends such a request with
    the page's Origin: without CORS for it, it is now a 403 and the model does not run. A page the server
    allows (--allowed-origin), one served beside the API through a proxy (Sec-Fetch-Site: same-origin), and a
    client that is no browser (no Origin: curl -d sends a form content type) are answered."""
    engine = Engine(TowerBackend(model), Tokenizer(folder), [2, 38], CFG, "tiny-test")
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    headers = {"Content-Type": content_type, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site",
               "Sec-Fetch-Mode": "no-cors"}

    def send(base, **changes):
        conn = connect(base)
        conn.request("POST", "/v1/completions", body=body,
                     headers={k: v for k, v in {**headers, **changes}.items() if v is not None})
        r = conn.getresponse()
        out = r.status, r.read()
        conn.close()
        return out

    with serving(engine) as base:
        status, text = send(base)
        assert status == 403 and "origin http://evil.example" in json.loads(text)["error"]["message"], text
        assert engine.counts["batches_total"] == 0  # the model never ran
        assert send(base, **{"Sec-Fetch-Site": "same-origin"})[0] == 200
        assert send(base, Origin=None, **{"Sec-Fetch-Site": None, "Sec-Fetch-Mode": None})[0] == 200
    with serving(engine, allowed_origins=["http://evil.example"]) as base:
        assert send(base)[0] == 200
    engine.close()


@pytest.mark.slow
def test_two_sigterms_in_quick_succession_stop_the_server_cleanly(folder):
    """`timeout` (and `kill` of a process group) delivers SIGTERM twice within milliseconds: the second cut the
    first one's shutdown short ("stopped" then "Error: interrupted", exit 1) or, once the default handler was
    back, killed the server on its way out (exit 143). After the first, later ones are ignored."""
    import os
    import signal
    import subprocess
    import sys

    for gap in (0.0, 0.02):
        proc = subprocess.Popen([sys.executable, "-m", "twotower_cli", "serve", "--model", str(folder), "--port", "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
        try:
            assert "/v1" in proc.stderr.readline()  # listening
            proc.send_signal(signal.SIGTERM)
            time.sleep(gap)
            proc.send_signal(signal.SIGTERM)
            rest = proc.communicate(timeout=60)[1]
        finally:
            proc.kill()
        assert proc.returncode == 0 and "stopped" in rest and "Error" not in rest, (gap, proc.returncode, rest)
