"""An OpenAI-compatible HTTP server over one loaded model (`twotower serve`), on the standard library's
`http.server`.

    GET  /health, /v1/models (with max_model_len, as vLLM's), /v1/models/{id} (the served model by its id,
         quoted: openai's `models.retrieve`), /metrics (Prometheus text: requests, tokens, batches, latency
         histograms, queue)
    POST /v1/completions       prompt: a string, a list of strings, a list of ids, or a list of id lists
    POST /v1/chat/completions  messages, rendered by the checkpoint's chat template (as `generate --chat`)

/models(/{id}), /completions and /chat/completions answer as the /v1 routes (as llama.cpp's server does; vLLM's
has /v1 only): an OpenAI client given the server's address without /v1 as its base_url still works.

HEAD on a GET route answers the GET's status and headers without the body; OPTIONS a 204 with the route's
methods in `Allow` (`OPTIONS *`: the server's); any other method a route does not take a 405 with `Allow`,
and a path the API does not have a 404, all as OpenAI error objects (so are http.server's own refusals: an
unknown method's 501, a request line it cannot read). A request target may be a path or a whole URL.

Connections are HTTP/1.1's: kept open between requests (for KEEP_ALIVE_SECONDS without one), a request body
read by its Content-Length or in chunks, `Expect: 100-continue` answered when the body is wanted, a stream
sent in chunks. An answer given before the body was read (an error) reads and drops the body first, so that
a client still sending it reads the answer rather than a reset, and the connection goes on; a body over
MAX_BODY_BYTES, or one whose end cannot be found, is not read, and the connection closes after the answer
(`Connection: close`, and a moment of reading what still comes, for the same reason). A request begun (its
first byte came) may go REQUEST_READ_SECONDS without another byte of its request line, headers or body, its
request line and headers may take REQUEST_HEAD_SECONDS in all (as nginx's client_header_timeout), its body
REQUEST_BODY_SECONDS and a second more for every BODY_MIN_RATE bytes that came (as Apache's mod_reqtimeout,
so that a large body over a slow link still comes): past any of these it is answered with a 408 and the
connection closes, so that a client that stalls, or trickles its request a byte at a time, does not hold a
thread for ever (`_Reads`). Once the request is read, the model
takes the time it needs; an answer's writes may each wait SEND_SECONDS for a client that stops reading (a
slow reader only has to read something in that time), else the connection closes, and a stream's rows end.

CORS (`allowed_origins`, `--allowed-origin`): none by default, so that a page of another origin in a browser
can neither send the API key nor read an answer (the server may hold a key, or serve a trusted network), and
a POST such a page sends without a preflight (a "simple" request: a text/plain or form body, a fetch of mode
no-cors), which carries its Origin, is refused with a 403 before the model runs for it; with origins, every answer
(errors and streams too) carries Access-Control-Allow-Origin (`*`, or the request's Origin where it is allowed,
with `Vary: Origin`), and a preflight OPTIONS is answered without asking for the API key (browsers send none)
with the route's methods, the headers asked for besides Authorization and Content-Type, and a Max-Age.

Request fields read: max_tokens (max_completion_tokens), temperature, top_p, top_k, seed, stop (a string or
a list of them), n, stream, stream_options, logprobs, top_logprobs, echo (completions), chat_template_kwargs
(template variables, as vLLM names them), skip_special_tokens (vLLM's; default false: the text keeps them);
and the sampler's own: mode, block_size, steps, threshold, policy, factor. A field that would change the output and is not honoured (logit_bias, the penalties, suffix,
best_of, response_format, tools, ...: `UNHONOURED`) is a 400 naming it unless its value changes nothing;
fields that change nothing of the output (user, metadata, store, ...) are accepted. `n` (up to 16) samples
that many choices of each prompt as rows of one batch (usage counts each prompt once). Unset fields take the
defaults given on the command line.

Each prompt of a request and its max_tokens together may not exceed the model's context length,
`max_model_len` (`--max-model-len`; by default the checkpoint's `max_position_embeddings`, which transformers
reads as 4096 where config.json has none): over it, for any of its prompts, is a 400 for the request (code
`context_length_exceeded`, as OpenAI's and vLLM's), so that no client ties the model up with a request of
10^12 tokens. A request without max_tokens gets the server's default cut to what fits beside each prompt
(each row its own cut), as vLLM does.

`logprobs` (chat: `logprobs: true` and `top_logprobs`; completions: `logprobs: k`) gives each returned
token's log-probability and the k most likely tokens at its position: in `mask_diffusion` under the
denoiser's forward that committed it, in `ar` / `mock_ar` under the next-token distribution (untempered
either way, so a sampled token need not be among them). Only those k ids and values come back from the
device. Completions' `echo` puts the prompt in front, its tokens scored by the context tower (one forward);
with `max_tokens: 0` that is all: what lm-eval's loglikelihood requests ask for. A stream's chunks carry
the logprobs of the tokens their text completed (`_Job._logprobs_sent`); with `echo`, a first chunk per
choice carries its prompt (`_Job.echo_piece`).

One thread runs the model. Requests queue for it; when it is idle it takes the oldest waiting request and
every other waiting one with the same mode and stop ids (mask_diffusion: and block size; no seed of its own, when
sampling), up to `--max-batch` prompts, and samples them as one batch (`batching.Continuous`; each row
keeps its own max_tokens, temperature, top_p, top_k, threshold, policy, factor and steps; a request of
more prompts than there is room for goes in part by part as rows end): clients that
send requests concurrently (evaluation harnesses do) share the forwards. The batch is continuous: between
blocks (ar, mock_ar: tokens) a request that has come since, with the same key, joins it while there is room,
and each request is answered as soon as its own rows end, which then leave the batch; `continuous=False`
(`--no-continuous`) keeps a batch closed until all of it is done. Greedy replies do not depend on the batch
(every row sees only its own tokens). Requests go through one `chat.PrefixReuse` backend, so a client that
sends its conversation again with a turn appended (every chat client does) pays for the new ids only: a
request of one prompt starts from the longest kept state its ids begin with, alone on an idle model from
the live state or a copy, joining a running batch from a copy (`PrefixReuse.join_one`). The backend keeps
a state copy at the last user message of each of the last `conversations` conversations
(`PrefixReuse(keep=...)`), so that holds across other clients' requests. Requests that neither keep nor find
a state join together, in one padded prefill.

`stream: true` answers with server-sent events as OpenAI does: a chunk each time text becomes final (per
committed block; ar: per token), then one with the finish reason, then `data: [DONE]`. Text that could
still be the start of a stop string, or ends inside a multi-byte character, is held back until it cannot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hmac
import io
import json
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from twotower_cli import sampler as S
from twotower_cli.batching import Continuous, RowBlock, RowDone, shared_settings
from twotower_cli.chat import PrefixReuse, start_from, template_ids
from twotower_cli.errors import TwoTowerError, lone_surrogate_at
from twotower_cli.text import ChatTemplate, StopTexts, Tokenizer
from twotower_cli.towers import token_log_probs

MAX_BODY_BYTES = 32 << 20  # a prompt of millions of tokens still fits
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
MAX_N = 16  # choices per prompt
# Request fields that would change the output and that the server does not honour: field → the values that
# change nothing (null always does). Any other value is a 400 naming the field (OpenAI's code
# `unsupported_parameter`), not an answer that silently differs from what was asked: OpenAI's fields, then
# vLLM's / llama.cpp's sampling extensions. The sampler has no hook for a bias or a penalty on the logits, no
# constrained decoding and no tool-call parser. Fields that change nothing of the output (user, metadata,
# store, service_tier, parallel_tool_calls, prediction, ...) and fields no server names are accepted.
UNHONOURED = {
    "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,), "suffix": ("",),
    "response_format": ({"type": "text"},), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"), "modalities": (["text"],), "audio": (), "reasoning_effort": (),
    "verbosity": (), "web_search_options": (),
    "min_p": (0,), "repetition_penalty": (1,), "min_tokens": (0,), "ignore_eos": (False,), "stop_token_ids": ([],),
    "use_beam_search": (False,), "include_stop_str_in_output": (False,), "add_generation_prompt": (True,),
    "continue_final_message": (False,), "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
    "structured_outputs": (), "grammar": (), "json_schema": (),
}
# Request fields the server reads (`Engine.parse`); any other, besides `UNHONOURED`'s, changes nothing of the
# answer and is named in the log (`Request.ignored`), as vLLM logs the fields it ignores: a client's typo
# ("max_token") or an option of another server then shows where the operator looks.
READ_FIELDS = frozenset({
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
    "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "best_of", "chat_template_kwargs",
    "mode", "block_size", "steps", "threshold", "policy", "factor", "skip_special_tokens",
})
ROUTES = {"/health": "GET", "/metrics": "GET", "/v1/models": "GET",  # path: its method (GET's answer HEAD too)
          "/v1/completions": "POST", "/v1/chat/completions": "POST"}
# the API's routes without /v1, as llama.cpp's server also answers them: a client given the server's address
# without /v1 as its base_url (a common mistake with OpenAI clients) asks for these
ALIASES = {"/models": "/v1/models", "/completions": "/v1/completions", "/chat/completions": "/v1/chat/completions"}
MODEL_ROUTE = "/v1/models/"  # + a model's id, percent-encoded as clients send it (a folder's `/` as %2F): GET
SERVER_METHODS = ("GET", "HEAD", "POST", "OPTIONS")  # what `OPTIONS *` answers
GONE_POLL_SECONDS = 0.5  # how often a request waiting for its answer asks whether its client is still there
CLOSE_SECONDS = 2.0  # how long `server_close` waits for the requests being handled to write their answers
KEEP_ALIVE_SECONDS = 75.0  # how long a connection may wait between requests (nginx's keepalive_timeout)
LINGER_SECONDS = 2.0  # how long a connection closed with a request body unread reads and drops the rest
REQUEST_READ_SECONDS = 30.0  # how long a request begun may go without a byte of it coming (then a 408)
REQUEST_HEAD_SECONDS = 60.0  # how long its request line and headers may take in all (nginx's client_header_timeout)
REQUEST_BODY_SECONDS = 60.0  # how long its body may take, and a second more for every BODY_MIN_RATE bytes that
BODY_MIN_RATE = 500  # came (Apache's mod_reqtimeout: body=...,MinRate=500): a slow link's large body still comes
SEND_SECONDS = 60.0  # how long an answer may wait for its client to read (then the connection closes)
CORS_MAX_AGE = 7200  # seconds a browser may keep a preflight's answer (Chromium keeps it 2 h at most)
CORS_HEADERS = ("Authorization", "Content-Type")  # request headers a cross-origin request may always send
METRICS = {  # name: (Prometheus type, help)
    "requests_total": ("counter", "Requests answered."),
    "failed_requests_total": ("counter", "Requests that failed in the model (answered with a 500)."),
    "prompt_tokens_total": ("counter", "Prompt tokens of the answered requests."),
    "cached_prompt_tokens_total": ("counter", "Of those, tokens the context tower held already and did not read."),
    "completion_tokens_total": ("counter", "Completion tokens returned."),
    "batches_total": ("counter", "Batches the model ran (from an idle model until it was idle again)."),
    "batched_requests_total": ("counter", "Requests in those batches (over batches_total: requests per batch)."),
    "joined_requests_total": ("counter", "Of those, requests that joined a batch already running."),
    "refused_requests_total": ("counter", "Requests refused with a 503 because --max-waiting requests waited."),
    "model_seconds_total": ("counter", "Seconds the model spent on batches."),
}


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
HISTOGRAMS = {  # name: help; seconds from the moment a request was queued
    "queue_seconds": "Seconds a request waited before it joined a batch.",
    "first_token_seconds": "Seconds until a request's first tokens were committed (its first block; ar: token).",
    "request_seconds": "Seconds until a request was answered.",
}


class Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, the sum and the count of the observations."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {total}')
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:g}", f"{name}_count {self.count}"]


class BadRequest(Exception):
    """A request the server refuses: 400 (or `status`) with an OpenAI-style error body (`code`: its `code`;
    `param`: the request field at fault, as OpenAI's errors name it)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param


def _failure(e: BaseException) -> str:
    """A failed request's 500 message: a TwoTowerError's own text (message and hint: NaN logits, say), else
    the exception's type and text."""
    return str(e) if isinstance(e, TwoTowerError) else f"{type(e).__name__}: {e}"


def _error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """An OpenAI error object, for an answer of `status` (or an error event in a stream)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- requests

@dataclass
class Request:
    prompts: list[list[int]]
    settings: S.SamplingConfig
    stops: list[str]
    seed: int | None
    stream: bool
    chat: bool
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool = False  # each returned token's log-probability
    top_logprobs: int = 0  # and the k most likely tokens at each position
    echo: bool = False  # completions: the prompt goes in front of the completion (and in the logprobs)
    score_only: bool = False  # echo with max_tokens 0: the prompt's logprobs, nothing sampled
    n: int = 1  # choices per prompt: `prompts` holds each prompt n times in a row
    max_tokens: list[int] = dataclasses.field(default_factory=list)  # per row: its own cut (`Engine._fit`)
    history: list[int] | None = None  # chat: the conversation before the generation prompt (`chat.start_from`)
    ignored: list[str] = dataclasses.field(default_factory=list)  # fields that change nothing here (`READ_FIELDS`)
    skip_special: bool = False  # skip_special_tokens: the text leaves out special tokens (<|im_end|>, <think>, ...)

    def decode(self, tokenizer: Tokenizer, ids: list[int]) -> str:
        """The reply's text of `ids`, with or without the special tokens as the request asked."""
        return tokenizer.decode(ids, skip_special_tokens=self.skip_special)


# The request fields that are `SamplingConfig` settings of the same name, and how `validate`'s messages name them.
SETTING_LABELS = {"mode": "mode", "block_size": "block size", "steps": "steps", "threshold": "threshold",
                  "policy": "policy", "factor": "factor", "temperature": "temperature", "top_k": "top-k",
                  "top_p": "top-p"}


def _number(body: dict, key: str, kind: type, default):
    value = body.get(key)
    if value is None:
        return default
    finite = not isinstance(value, float) or math.isfinite(value)  # JSON's NaN, Infinity and 1e400 are floats
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite or (
            kind is int and value != int(value)):
        raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'}, not {value!r}", param=key)
    return kind(value)


def _flag(body: dict, key: str) -> bool:
    """A true-or-false field (absent or null: false). Read by truthiness, "false" was true (a stream came back)."""
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be true or false, not {value!r}", param=key)
    return bool(value)


def _lone_surrogate_field(body: dict) -> str | None:
    """The first top-level field of `body` holding a string with a lone UTF-16 surrogate (JSON's "\ud800"
    escape), which is no text: the tokenizer refuses it (it was a 500, "TextInputSequence must be str")."""
    for key, value in body.items():
        pending = [value]
        while pending:  # iterative: nesting as deep as json.loads allows
            item = pending.pop()
            if isinstance(item, str):
                if lone_surrogate_at(item) is not None:
                    return key
            elif isinstance(item, dict):
                pending.extend(item.keys())
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)
    return None


def _refuse_unhonoured(body: dict, chat: bool, n: int) -> None:
    """A 400 naming the first field of `body` that would change the output and is not honoured: one of
    `UNHONOURED` with a value other than its neutral ones, completions' `best_of` other than `n` (the server
    returns every choice it samples), chat's `echo` (vLLM's extension; completions' is honoured)."""
    for field, neutral in [*UNHONOURED.items(), ("echo", (False,))] if chat else UNHONOURED.items():
        value = body.get(field)
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool)
                                         for v in neutral):  # 0.0 is 0, false is not
            leave = " or ".join(["leave it out", *(f"send {json.dumps(v)}" for v in neutral)])
            raise BadRequest(f"'{field}' is not supported by this server, which would answer as if it were not "
                             f"given: {leave}", code="unsupported_parameter", param=field)
    best_of = _number(body, "best_of", int, None)
    if not chat and best_of is not None and best_of != n:
        raise BadRequest(f"'best_of' {best_of} is not supported by this server, which returns every choice it "
                         f"samples: leave it out, or ask for n choices with 'n'", code="unsupported_parameter",
                         param="best_of")


def template_variables_taken(variables: dict) -> str | None:
    """The chat-template variables the server sets itself (the conversation, and the generation prompt that
    opens the reply) that `variables` would set too, or None."""
    taken = [k for k in ("messages", "add_generation_prompt") if k in variables]
    return ", ".join(taken) or None


def _text_of(content) -> str:
    """A message's content: a string, or OpenAI's list of parts, of which the text parts are read (null, as
    an assistant's message with tool calls has it: empty)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" for p in content):
            raise BadRequest("only text message parts are supported", param="messages")
        if not all(isinstance(p.get("text"), str) for p in content):  # it read a missing one as "", 3 as "3"
            raise BadRequest("a text part needs a string 'text', as in {\"type\": \"text\", \"text\": \"Hi\"}",
                             param="messages")
        return "".join(p["text"] for p in content)
    raise BadRequest("a message's 'content' must be a string or a list of text parts", param="messages")


def _content_of(i: int, message: dict) -> str:
    """Message `i`'s text (`_text_of`). Its content is required, as OpenAI requires it, except on an assistant
    message that carries tool calls (OpenAI's shape for a turn that only called tools: content absent or
    null), which the chat template is given as it is."""
    content = message.get("content")
    if content is None and not (message["role"] == "assistant" and (message.get("tool_calls")
                                                                      or message.get("function_call"))):
        raise BadRequest(f"messages[{i}] ({message['role']}) has " + ("a null" if "content" in message else "no")
                         + " 'content': only an assistant message with tool_calls may leave it out", param="messages")
    try:
        return _text_of(content)
    except BadRequest as e:
        raise BadRequest(f"messages[{i}]: {e.message}", param="messages") from None


PROMPT_SHAPES = "'prompt' must be a string, a list of strings, a list of ids or a list of id lists"


def _prompts(body: dict, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    """/v1/completions' prompt → ids per prompt (ids: below the model's vocabulary size, which may exceed
    the tokenizer's)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]  # one prompt given as ids
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest(PROMPT_SHAPES, param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(tokenizer.encode(p))
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(list(p))
        else:
            raise BadRequest(PROMPT_SHAPES, param="prompt")
        if not out[-1]:
            raise BadRequest("a prompt is empty", param="prompt")
        if not all(0 <= t < vocab_size for t in out[-1]):
            raise BadRequest(f"a prompt id is outside the vocabulary (0..{vocab_size - 1})", param="prompt")
    return out


# ---------------------------------------------------------------------------------------------- the engine

@dataclass
class Piece:
    """What one sampler event made final: per prompt, new text (may be empty), and with `logprobs` the
    logprobs object (`_logprobs_body`) of the tokens that text completed (None: none)."""
    deltas: list[str]
    logprobs: list[dict | None] | None = None


@dataclass
class Result:
    texts: list[str]
    finish_reasons: list[str]  # "stop" (an end id or a stop string) or "length"
    prompt_tokens: int
    cached_tokens: int  # prompt ids the context tower held from an earlier request (not read again)
    completion_tokens: int
    nfe: int
    seconds: float
    batch: int = 1  # requests sampled together in its batch
    token_ids: list[list[int]] = dataclasses.field(default_factory=list)  # per prompt: the tokens counted
    logprobs: list[list[float | None]] = dataclasses.field(default_factory=list)  # per prompt, per token
    top: list[list[list[tuple[int, float]] | None]] = dataclasses.field(default_factory=list)  # and its top k


@dataclass(eq=False)
class _Ticket:
    """A request waiting for the model, or being sampled: its outputs go into `out` (pieces, then the result or
    an exception); `cancelled` is set when its reader stops reading."""
    req: Request
    out: queue.Queue
    cancelled: threading.Event
    queued: float = dataclasses.field(default_factory=time.perf_counter)


def _batch_key(req: Request) -> tuple:
    """Requests with equal keys can be sampled as one batch: the settings a batch's rows share (mode, stop
    ids, and in mask_diffusion block size and mask id: `shared_settings`; each row has its own max_tokens,
    temperature, top_p, top_k, threshold, policy, factor and steps), and no seed of their own (a seeded sampling request gets a batch of its own, so that
    its seed reproduces it)."""
    own_seed = req.settings.temperature > 0 and req.seed is not None
    shared = shared_settings(req.settings)
    return (shared, id(req) if own_seed else None, req.score_only)


class Engine:
    """The model side of the server: parses a request body into a `Request` and runs it."""

    def __init__(self, backend, tokenizer: Tokenizer, eos_ids: list[int], defaults: S.SamplingConfig, name: str,
                 template: ChatTemplate | None = None, variables: dict | None = None, seed: int = 0,
                 max_batch: int = 16, conversations: int = 8, continuous: bool = True, max_waiting: int = 0,
                 max_model_len: int | None = None):
        self.backend = PrefixReuse(backend, keep=conversations)
        # tokens of prompt and completion a request may take (None: the checkpoint's max_position_embeddings)
        self.max_model_len = max_model_len or backend.ar.cfg.max_position_embeddings
        self.max_batch, self.continuous, self.max_waiting = max_batch, continuous, max_waiting
        self.pending: list[_Ticket] = []  # requests waiting for the model, oldest first
        self.queued = threading.Condition()  # guards `pending` and `worker`
        self.worker: threading.Thread | None = None
        self.open: set[_Ticket] = set()  # requests not answered yet, waiting or running (`close`)
        self.closing = False  # `close` was called: the model's thread ends, new requests get a 503
        self.tokenizer, self.eos_ids, self.defaults, self.name = tokenizer, list(eos_ids), defaults, name
        self.template, self.variables = template, dict(variables or {})
        self.lock = threading.Lock()  # held by the model's thread while it samples a batch
        self.counts = dict.fromkeys(METRICS, 0)  # written by the model's thread only (`/metrics`)
        self.latency = {name: Histogram() for name in HISTOGRAMS}  # likewise
        self.running = 0  # requests in the batch the model runs now
        self.generator = torch.Generator().manual_seed(seed)
        self.created = int(time.time())

    def model_object(self) -> dict:
        """The served model as /v1/models lists it and /v1/models/{id} answers it; `max_model_len` as vLLM's
        (how a client learns the context)."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "twotower",
                "max_model_len": self.max_model_len}

    def parse(self, body: dict, chat: bool) -> Request:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if (field := _lone_surrogate_field(body)) is not None:
            raise BadRequest(f"'{field}' holds a lone UTF-16 surrogate (an escape like \\ud800 that is half of a "
                             "pair), which is no text", param=field)
        n = _number(body, "n", int, 1)
        if not 1 <= n <= MAX_N:
            raise BadRequest(f"'n' must be between 1 and {MAX_N}", param="n")
        _refuse_unhonoured(body, chat, n)
        logprobs, top = self._logprobs(body, chat)
        echo = not chat and _flag(body, "echo")
        history = None
        if chat:
            prompt, history = self._render(body)
            prompts = [prompt]
        else:
            prompts = _prompts(body, self.tokenizer, self.backend.vocab_size)
        where = "the conversation" if chat else "the prompt" if len(prompts) == 1 else "the longest prompt"
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise BadRequest("'stop' must be a string or a list of non-empty strings", param="stop")
        d = self.defaults
        top_p = _number(body, "top_p", float, d.top_p)
        top_k = _number(body, "top_k", int, d.top_k)  # 0 or -1: no top-k, as other servers read it
        completion = _number(body, "max_completion_tokens", int, None)
        max_tokens = _number(body, "max_tokens", int, None)  # the older name wins where both are given
        field, wanted = ("max_tokens", max_tokens) if max_tokens is not None else ("max_completion_tokens", completion)
        # each prompt its own cut, as vLLM's get_max_tokens: the default cut to what fits beside that prompt,
        # not beside the longest; longest first, so that a 400 (any row it cannot fit) names the longest
        lengths = sorted({len(p) for p in prompts}, reverse=True)
        cuts = {length: self._fit(length, wanted, field, where) for length in lengths}
        score_only = wanted == 0 and echo
        if wanted == 0 and not echo:
            raise BadRequest("max_tokens 0 asks for nothing" + ("" if chat else ": add 'echo' to score the prompt"),
                             param=field)
        prompts = [p for p in prompts for _ in range(n)]  # n choices a prompt: rows of one batch, in order
        rows_max = [1 if score_only else cuts[len(p)] for p in prompts]
        settings = replace(
            d, max_new_tokens=max(rows_max),
            temperature=_number(body, "temperature", float, d.temperature),
            top_p=None if top_p == 1.0 else top_p, top_k=top_k if top_k is not None and top_k > 0 else None,
            mode=body.get("mode", d.mode), block_size=_number(body, "block_size", int, d.block_size),
            steps=_number(body, "steps", int, d.steps), threshold=_number(body, "threshold", float, d.threshold),
            policy=body.get("policy", d.policy), factor=_number(body, "factor", float, d.factor))
        try:
            settings.validate(self.backend.vocab_size)
        except S.SettingError as e:  # named as the request names it: 'top_p' 0.0 must be in (0, 1]
            label = SETTING_LABELS.get(e.setting)
            if label is None or not e.message.startswith(label) or e.setting not in body:
                raise BadRequest(e.message) from None  # a server default (--mask-token-id) or one it derives
            raise BadRequest(f"'{e.setting}'{e.message[len(label):]}", param=e.setting) from None
        if settings.mode != "ar" and self.backend.inner.twotower is None:
            raise BadRequest("this model has no denoiser: only mode 'ar'", param="mode")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest(f"'stream_options' must be an object, not {options!r}", param="stream_options")
        stream = _flag(body, "stream")
        include_usage = _flag(options, "include_usage")
        skip = body.get("skip_special_tokens", False)
        if not isinstance(skip, bool):
            raise BadRequest("'skip_special_tokens' must be true or false", param="skip_special_tokens")
        seed = _number(body, "seed", int, None)
        if seed is not None and not S.seed_in_range(seed):
            raise BadRequest(f"'seed' must be a 64-bit integer, not {seed}", param="seed")
        return Request(prompts, settings, stops, seed, stream, chat,
                       include_usage=include_usage,
                       history=history, logprobs=logprobs, top_logprobs=top, echo=echo, score_only=score_only, n=n,
                       max_tokens=rows_max, ignored=sorted(k for k in body if k not in READ_FIELDS | UNHONOURED.keys()),
                       skip_special=skip)

    def _fit(self, prompt: int, wanted: int | None, field: str, where: str) -> int:
        """The completion tokens of a prompt of `prompt` tokens: `wanted` (its request's max_tokens), refused
        when prompt and completion exceed `max_model_len` (as OpenAI and vLLM refuse it: the whole request, for
        any of its prompts); None: the server's default, cut to what fits beside this prompt."""
        if wanted is not None and wanted < 0:
            raise BadRequest(f"'{field}' {wanted} must be 0 or more", param=field)
        limit = self.max_model_len
        room = limit - prompt
        context = f"this model's maximum context length is {limit} tokens (prompt and completion together)"
        if room < 0 or (room == 0 and wanted != 0):
            raise BadRequest(f"{context}, and {where} alone is {prompt} tokens"
                             + (", which leaves no room for a completion" if room == 0 else "") + f"; shorten {where}",
                             code="context_length_exceeded", param="messages" if where == "the conversation" else "prompt")
        if wanted is None:
            return min(self.defaults.max_new_tokens, room)
        if wanted > room:
            raise BadRequest(f"{context}, and this request asks for {prompt + wanted}: {prompt} in {where} and "
                             f"{wanted} to complete; set '{field}' to {room} or less, or shorten {where}",
                             code="context_length_exceeded", param=field)
        return wanted

    @staticmethod
    def _logprobs(body: dict, chat: bool) -> tuple[bool, int]:
        """(whether the request asks for logprobs, how many most likely tokens per position): chat's
        `logprobs: true` and `top_logprobs`, completions' `logprobs: k` (an int, 0 for the chosen tokens only)."""
        value = body.get("logprobs")
        if chat:
            if value not in (None, True, False):
                raise BadRequest("'logprobs' must be true or false", param="logprobs")
            wanted, top = value is True, _number(body, "top_logprobs", int, 0)
            if top and not wanted:
                raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        else:
            wanted = value is not None and value is not False
            if wanted and (isinstance(value, bool) or not isinstance(value, int)):
                raise BadRequest("'logprobs' must be a non-negative integer", param="logprobs")
            top = value if wanted else 0
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
                             param="top_logprobs" if chat else "logprobs")
        return wanted, top

    def _render(self, body: dict) -> tuple[list[int], list[int] | None]:
        if self.template is None:
            raise BadRequest("this model has no chat template: use /v1/completions")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
        messages = [{**m, "content": _content_of(i, m)} for i, m in enumerate(messages)]
        variables = body.get("chat_template_kwargs") or {}
        if not isinstance(variables, dict):
            raise BadRequest("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
        if taken := template_variables_taken(variables):
            raise BadRequest(f"'chat_template_kwargs' cannot set {taken}: the server does",
                             param="chat_template_kwargs")
        try:
            return template_ids(self.template, self.tokenizer, messages, {**self.variables, **variables})
        except TwoTowerError as e:
            raise BadRequest(e.message) from None

    def run(self, req: Request, gone: Callable[[], bool] | None = None, room: bool = False) -> Iterator[Piece | Result]:
        """Queue `req` for the model; yield, for a stream, `Piece`s as its text becomes final (their deltas add
        up to the result's texts), then its `Result`. Requests with the same batch key share a batch
        (`_take`, `_sample`). Closing the iterator early (a client gone mid-stream) ends its rows at the next
        block; so does `gone()` turning true while it waits (asked every `GONE_POLL_SECONDS`; a client that
        leaves before its answer): then it raises ConnectionResetError. `room`: refused with a 503 when
        `max_waiting` requests wait already, checked as it is queued (`check_room` before it is not enough: many
        requests at once all pass it before any is queued)."""
        ticket = _Ticket(req, queue.Queue(), threading.Event())
        with self.queued:
            if self.closing:
                raise BadRequest("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
            if room:
                self._check_room()
            self.open.add(ticket)
            self.pending.append(ticket)
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="twotower-engine", daemon=True)
                self.worker.start()
            self.queued.notify()
        try:
            while True:
                try:
                    item = ticket.out.get(timeout=None if gone is None else GONE_POLL_SECONDS)
                except queue.Empty:
                    if gone():
                        raise ConnectionResetError("the client went away") from None
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Result):
                    return
        finally:
            ticket.cancelled.set()
            with self.queued:
                self.open.discard(ticket)

    def close(self) -> None:
        """Stop the model (the server shuts down): every request waiting or running is answered with a 503,
        the running batch stops before its next block (ar: token), and the model's thread ends; this returns
        once it has (a thread still inside torch when the interpreter exits aborts the process)."""
        with self.queued:
            self.closing = True
            tickets, worker = list(self.open), self.worker
            self.queued.notify_all()
        for t in tickets:
            t.out.put(BadRequest("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE))
            t.cancelled.set()
        if worker is not None:
            worker.join()

    def check_room(self) -> None:
        """A 503 (BadRequest) when `max_waiting` requests wait for the model already (0: no limit): asked before
        a stream's headers go out, so that a refusal is an HTTP 503; `run(room=True)` asks again as it queues."""
        with self.queued:
            self._check_room()

    def _check_room(self) -> None:  # under `queued`
        if self.max_waiting and len(self.pending) >= self.max_waiting:
            self.counts["refused_requests_total"] += 1
            raise BadRequest(f"the server is busy: {len(self.pending)} requests are waiting for the model; "
                             "retry in a moment", HTTPStatus.SERVICE_UNAVAILABLE)

    def _work(self) -> None:
        """The model's thread: waits for requests, then takes the oldest with all that can share its batch."""
        while True:
            with self.queued:
                while not self.pending and not self.closing:
                    self.queued.wait()
                if self.closing:
                    return
            with self.lock:  # whoever holds the lock (a test) makes requests queue up, as a long batch does
                with self.queued:
                    tickets = self._take(None, self.max_batch)
                if not tickets:
                    continue
                t0 = time.perf_counter()
                self.counts["batches_total"] += 1
                if not tickets[0].req.score_only:
                    self._sample(tickets)  # answers each request, with the error if one is raised
                else:
                    try:
                        self._score(tickets)
                    except BaseException as e:  # noqa: BLE001 — each request answers with the error; the server lives
                        self.counts["failed_requests_total"] += len(tickets)
                        for t in tickets:
                            t.out.put(e)
                self.counts["model_seconds_total"] += time.perf_counter() - t0

    def _answer(self, ticket: _Ticket, result: Result) -> None:
        """Hand `ticket` its result, and count it for `/metrics`."""
        c = self.counts
        c["requests_total"] += 1
        c["prompt_tokens_total"] += result.prompt_tokens
        c["cached_prompt_tokens_total"] += result.cached_tokens
        c["completion_tokens_total"] += result.completion_tokens
        self.latency["request_seconds"].observe(time.perf_counter() - ticket.queued)
        ticket.out.put(result)

    def metrics(self) -> str:
        """The counters and latency histograms in Prometheus' text format, and the requests waiting and
        running now."""
        lines = []
        for name, (kind, text) in METRICS.items():
            lines += [f"# HELP twotower_{name} {text}", f"# TYPE twotower_{name} {kind}",
                      f"twotower_{name} {self.counts[name]:g}"]
        for name, text in HISTOGRAMS.items():
            lines += [f"# HELP twotower_{name} {text}", f"# TYPE twotower_{name} histogram",
                      *self.latency[name].lines(f"twotower_{name}")]
        lines += ["# HELP twotower_waiting_requests Requests waiting for the model now.",
                  "# TYPE twotower_waiting_requests gauge", f"twotower_waiting_requests {len(self.pending)}",
                  "# HELP twotower_running_requests Requests in the batch the model runs now.",
                  "# TYPE twotower_running_requests gauge", f"twotower_running_requests {self.running}"]
        return "\n".join(lines) + "\n"

    def _take(self, key: tuple | None, room: int) -> list[_Ticket]:
        """Waiting requests with batch key `key` (None: the oldest's key, and the oldest whatever its size),
        oldest first, up to `room` prompts in all; requests whose clients left are dropped."""
        self.pending = [t for t in self.pending if not t.cancelled.is_set()]
        if not self.pending:
            return []
        first = key is None
        key = _batch_key(self.pending[0].req) if first else key
        taken, rows = [], 0
        for t in self.pending:
            n = len(t.req.prompts)
            if _batch_key(t.req) == key and ((first and not taken) or rows + n <= room):
                taken.append(t)
                rows += n
        self.pending = [t for t in self.pending if t not in taken]
        self.counts["batched_requests_total"] += len(taken)
        return taken

    def _prompt_logprobs(self, ids: list[int], top: int) -> tuple[list[float | None], list]:
        """Each prompt token's log-probability under the context tower (the first has none), and the `top`
        most likely tokens at each position: one forward, as in `towers.token_log_probs`."""
        lps, top_ids, top_lps = token_log_probs(self.backend.inner.ar, ids, top=top)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_lps.tolist(), strict=True)]
        return [None, *lps.tolist()], [None, *tops] if top else []

    def _score(self, tickets: list[_Ticket]) -> None:
        """echo with max_tokens 0: each prompt's logprobs, nothing sampled."""
        for t in tickets:
            t0 = time.perf_counter()
            echoed = _Job(t, self).echoed()  # (streamed: the job's first piece has sent them)
            n = len(t.req.prompts)
            self._answer(t, Result([text for text, _, _ in echoed], ["length"] * n,
                             sum(len(ids) for ids in t.req.prompts) // t.req.n, 0, 0, n, time.perf_counter() - t0,
                             len(tickets), [list(ids) for ids in t.req.prompts], [lps for _, lps, _ in echoed],
                             [tops if t.req.top_logprobs else [] for _, _, tops in echoed]))

    def _sample(self, tickets: list[_Ticket]) -> None:
        """Sample `tickets` as one `Continuous` batch, handing each its pieces and result as its rows end;
        between blocks (ar, mock_ar: tokens) waiting requests with the same batch key join it (`continuous`)."""
        first = tickets[0].req
        key = _batch_key(first)
        sampled = first.settings.temperature > 0 and first.seed is not None  # then it is alone in its batch
        jobs: dict[int, _Job] = {}  # row id → its request's job
        live: list[_Job] = []

        def until(row: int, ids: list[int]) -> bool:  # a stop string written, or its client gone
            job = jobs[row]
            return job.ticket.cancelled.is_set() or (job.stop_written is not None and job.stop_written(row, ids))

        queued: list[_Job] = []  # requests with prompts not in the batch yet, oldest first
        try:  # from the first line: an error here that ended the model's thread would leave every client waiting
            generator = torch.Generator().manual_seed(first.seed) if sampled else self.generator
            batch = Continuous(self.backend, first.settings, self.eos_ids, generator, until)
            while (tickets or len(batch) or queued) and not self.closing:
                if tickets:
                    new, tickets = [_Job(t, self) for t in tickets], []
                    live += new  # from here on, an error is theirs too
                    queued += new
                queued = self._fill(batch, queued, jobs)
                for job in live:
                    job.batch = max(job.batch, len(live))
                self.running = len(live)
                events = batch.step()
                for job in live:
                    if job.take(events) and job.first is None:
                        job.first = time.perf_counter()
                        self.latency["first_token_seconds"].observe(job.first - job.ticket.queued)
                for job in [j for j in live if j.finished]:
                    live.remove(job)
                    self._answer(job.ticket, job.result())
                room = self.max_batch - len(batch) - sum(j.remaining for j in queued)
                if self.continuous and room > 0:
                    with self.queued:
                        tickets = self._take(key, room)
                    self.counts["joined_requests_total"] += len(tickets)
        except BaseException as e:  # noqa: BLE001 — each request answers with the error; the server lives
            self.counts["failed_requests_total"] += len(live) + len(tickets)
            for job in live:
                job.ticket.out.put(e)
            for t in tickets:
                t.out.put(e)
        finally:
            self.running = 0

    def _fill(self, batch: Continuous, queued: list[_Job], jobs: dict) -> list[_Job]:
        """Admit the queued requests' prompts, oldest first, while the batch has room (`max_batch` rows; a
        request of more prompts goes in part by part as rows end); the requests still queued. One at a time,
        each its read counted: a request alone on an idle model, and those whose prompt a kept state begins
        or that keep one for their next turn; the rest in one padded prefill."""
        room, plan = self.max_batch - len(batch), []
        for job in queued:
            if min(room, job.remaining) <= 0:
                break
            plan.append((job, min(room, job.remaining)))
            room -= plan[-1][1]
        fresh = not len(batch)
        solo = [job for job, _ in plan if len(job.ticket.req.prompts) == 1
                and ((fresh and len(plan) == 1) or self._keeps_state(job.ticket.req))]
        group = [(job, n) for job, n in plan if job not in solo]
        for job, n in group:
            self._admit(batch, job, False, jobs, reuse=False, count=n)
        if group:
            batch.admit()
            fresh = False
        for job in solo:
            self._admit(batch, job, fresh, jobs)
            fresh = False
        return [job for job in queued if job.remaining]

    def _keeps_state(self, req: Request) -> bool:
        """Whether a request of one prompt has a history to keep a state at (a chat turn), or a kept state
        begins its prompt: then it joins on its own (`PrefixReuse.join_one`)."""
        return len(req.prompts) == 1 and (req.history is not None or self.backend.kept(req.prompts[0]) > 0)

    def _admit(self, batch: Continuous, job: _Job, fresh: bool, jobs: dict, reuse: bool = True,
               count: int | None = None) -> None:
        """Add `job`'s next `count` prompts (all) to `batch` (read now unless `reuse` is False: the caller
        admits a group). A request of one prompt may start from a state the backend kept (`PrefixReuse`):
        alone in a fresh batch from the live state or a snapshot (`start_from`), joining a running one from a
        snapshot (`join_one`); either way a snapshot is kept at its history, and `job.cached` counts the
        prompt ids not read."""
        req = job.ticket.req
        if not job.rows:
            job.t0 = time.perf_counter()
            self.latency["queue_seconds"].observe(job.t0 - job.ticket.queued)
        first = len(job.rows)
        prompts = req.prompts[first:][:count or job.remaining]
        one = reuse and len(req.prompts) == 1
        fed = self.backend.fed
        if one and fresh:
            start_from(self.backend, req.prompts[0], req.history)
        for prompt, cut in zip(prompts, req.max_tokens[first:first + len(prompts)], strict=True):  # each its own cut
            job.add_rows(batch.add([prompt], cut, req.top_logprobs, reuse=one, history=req.history if one else None,
                                   settings=req.settings))
        jobs.update(dict.fromkeys(job.rows, job))
        if reuse:
            batch.admit()
        if one:
            fed_prompt = len(req.prompts[0]) - (req.settings.mode == "mock_ar")  # its context runs one behind
            job.cached = max(fed_prompt - (self.backend.fed - fed), 0)



class _Job:
    """A request in a running batch: its rows' ids, log-probabilities and ends, and the text it has been sent."""

    def __init__(self, ticket: _Ticket, engine: Engine):
        self.ticket, self.engine = ticket, engine
        self.stops = S.stop_set(ticket.req.settings, engine.eos_ids)
        # its text: cut at the first end id and stop string; a stop string written is asked after every step
        # (`Continuous`), on the newest ids only
        self.cutter = StopTexts(ticket.req.stops, self.decode, self.stops, ticket.req.settings.block_size)
        self.stop_written = self.cutter.until
        self.rows: list[int] = []  # its row ids in the batch, in the order of its prompts (`add_rows`)
        self.mine: set[int] = set()
        self.ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}  # log p of each token at its commit
        self.top: dict[int, list[list[tuple[int, float]]]] = {}  # and the most likely tokens there
        self.sent: dict[int, str] = {}
        self.sent_tokens: dict[int, int] = {}  # stream with logprobs: the tokens whose logprobs were sent
        self.sent_chars: dict[int, int] = {}  # and the length of their text
        self.flushed: set[int] = set()  # rows whose end the stream has been given
        self.done: dict[int, S.Generation] = {}
        self.cached = 0  # prompt ids the backend held already
        self.batch = 1  # the most requests sampled together while it ran
        self.t0 = time.perf_counter()  # when it joined the batch
        self.first: float | None = None  # when its first tokens were committed
        self._echoed: list[tuple[str, list, list]] | None = None  # echo: per prompt (text, logprobs, tops)
        if ticket.req.echo and ticket.req.stream:  # the prompts come first, before any token is sampled
            ticket.out.put(self.echo_piece())

    def echoed(self) -> list[tuple[str, list, list]]:
        """With `echo`, per prompt of the request (choices in order): its text, and with `logprobs` its tokens'
        log-probabilities and most likely tokens, None per token without `top_logprobs`
        (`Engine._prompt_logprobs`, one forward, computed once)."""
        if self._echoed is None:
            req = self.ticket.req
            scored = {}
            if req.logprobs:  # (a prompt asked n times is scored once)
                for p in map(tuple, req.prompts):
                    if p not in scored:
                        lps, tops = self.engine._prompt_logprobs(list(p), req.top_logprobs)
                        scored[p] = lps, tops or [None] * len(p)
            self._echoed = [(self.decode(p), *scored.get(tuple(p), ([], []))) for p in req.prompts]
        return self._echoed

    def echo_piece(self) -> Piece:
        """A stream's first piece with `echo`: each choice's prompt text, and its logprobs object when asked."""
        req = self.ticket.req
        bodies = [_logprobs_body(self.engine.tokenizer, p, lps, tops if req.top_logprobs else None, False,
                                 self.decode)
                  for p, (_, lps, tops) in zip(req.prompts, self.echoed(), strict=True)] if req.logprobs else None
        return Piece([text for text, _, _ in self.echoed()], bodies)

    def add_rows(self, rows: list[int]) -> None:
        """Its next prompts' row ids (a request of more prompts than the batch has room for comes in parts)."""
        self.rows += rows
        self.mine.update(rows)

    @property
    def remaining(self) -> int:
        """Its prompts not in the batch yet."""
        return len(self.ticket.req.prompts) - len(self.rows)

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.ticket.req.prompts)

    def decode(self, ids: list[int]) -> str:
        return self.ticket.req.decode(self.engine.tokenizer, ids)

    def take(self, events: list[RowBlock | RowDone]) -> bool:
        """Note a step's events for its rows; a streamed request gets a `Piece` of the text that became final.
        Whether any row got tokens."""
        grown = []
        for ev in events:
            if ev.row not in self.mine:
                continue
            if isinstance(ev, RowBlock):
                self.ids.setdefault(ev.row, []).extend(ev.tokens)
                self.logprobs.setdefault(ev.row, []).extend(map(_own_logprob, ev.tokens, ev.confidences,
                                                                ev.top or [None] * len(ev.tokens)))
                self.top.setdefault(ev.row, []).extend(ev.top or [])
                grown.append(ev.row)
            else:
                self.done[ev.row] = ev.generation
        if not self.ticket.req.stream or not (grown or set(self.done) - self.flushed):
            return bool(grown)
        deltas, logprobs = [], []
        for row in self.rows:
            delta, lp = "", None
            if row in grown or (row in self.done and row not in self.flushed):
                if row in self.done:
                    self.flushed.add(row)
                    safe = self.cutter.final(self.done[row].token_ids)[0]
                else:
                    safe = self.cutter.settled(self.ids[row])
                sent = self.sent.get(row, "")
                delta = safe[len(sent):] if safe.startswith(sent) else ""
                self.sent[row] = sent + delta
                if self.ticket.req.logprobs:
                    lp = self._logprobs_sent(row)
            deltas.append(delta)
            logprobs.append(lp)
        if any(deltas) or any(lp is not None for lp in logprobs):
            self.ticket.out.put(Piece(deltas, logprobs if self.ticket.req.logprobs else None))
        return True

    def _logprobs_sent(self, row: int) -> dict | None:
        """A stream's logprobs for the tokens of `row` whose text has now been sent in full (once it is done:
        every token the whole reply reports, through a stop string as `result` counts them); None if none."""
        req, tok = self.ticket.req, self.engine.tokenizer
        ids, first = self.ids[row], self.sent_tokens.get(row, 0)
        base = self.sent_chars.get(row, 0)  # the text of the tokens already reported
        if row in self.done:
            ids = self.done[row].token_ids
            last = len(self.cutter.ids_through(ids))
        else:
            sent, last = self.sent.get(row, ""), first

            def sent_in_full(text: str, within: str) -> bool:
                return within.startswith(text) and not text.endswith("\ufffd")

            # the new tokens decoded on their own (a few at a time, not the whole reply per token); where a
            # tokenizer decodes a slice otherwise (one that drops a leading space), the whole prefix decides
            while last < len(ids) and (sent_in_full(self.decode(ids[first:last + 1]), sent[base:])
                                       or sent_in_full(self.decode(ids[:last + 1]), sent)):
                last += 1
        if last <= first:
            return None
        self.sent_tokens[row] = last
        self.sent_chars[row] = len(self.decode(ids[:last]))
        body = _logprobs_body(tok, ids[first:last], self.logprobs[row][first:last],
                              self.top[row][first:last] if req.top_logprobs else None, req.chat, self.decode)
        if not req.chat:  # offsets in the whole reply (after the prompt, with echo), not in this piece
            base += len(self.echoed()[self.rows.index(row)][0]) if req.echo else 0
            body["text_offset"] = [base + o for o in body["text_offset"]]
        return body

    def result(self) -> Result:
        req = self.ticket.req
        gens = [self.done[r] for r in self.rows]
        finals = [self.cutter.final(g.token_ids) for g in gens]
        # a stop string: the tokens through it, as a token-at-a-time server counts them (the rest of the
        # block that wrote it was sampled, and thrown away with the text after it)
        used = [len(self.cutter.ids_through(g.token_ids)) for g in gens]
        texts = [text for text, _ in finals]
        ids_out = [g.token_ids[:n] for g, n in zip(gens, used, strict=True)]
        lps: list[list[float | None]] = []
        tops: list[list] = []
        if req.logprobs:
            lps = [self.logprobs[r][:n] for r, n in zip(self.rows, used, strict=True)]
            tops = [self.top[r][:n] for r, n in zip(self.rows, used, strict=True)]
        if req.echo:  # the prompt in front, scored by the context tower when asked
            for j, (prompt, (text, p_lps, p_tops)) in enumerate(zip(req.prompts, self.echoed(), strict=True)):
                texts[j] = text + texts[j]
                ids_out[j] = prompt + ids_out[j]
                if req.logprobs:
                    lps[j] = p_lps + lps[j]
                    tops[j] = p_tops + tops[j]
        return Result(texts, ["length" if g.finish_reason == "length" else "stop" for g in gens],
                      sum(len(p) for p in req.prompts) // req.n, self.cached, sum(used), max(g.nfe for g in gens),
                      time.perf_counter() - self.t0, self.batch, ids_out,
                      lps if req.logprobs else [], tops if req.top_logprobs else [])


# ---------------------------------------------------------------------------------------------- HTTP

def _own_logprob(token: int, confidence: float, top: list[tuple[int, float]] | None) -> float:
    """A committed token's log-probability: its entry's among the most likely ones when it is there (the same
    float32 log-softmax, so `token.logprob == top[token]` holds for a client), else the log of its probability."""
    found = next((lp for i, lp in top if i == token), None) if top else None
    if found is not None:
        return found
    return math.log(confidence) if confidence > 0 else -math.inf


class _Reads(io.RawIOBase):
    """A connection's reads, under its `rfile`'s buffer, against a deadline for the request being read: each
    read waits REQUEST_READ_SECONDS at most, and none goes past `deadline` (a TimeoutError then), which each
    byte read moves 1/`rate` s later (0: not at all). Without a deadline (between requests, while an answer is
    written) a read waits the socket's own timeout."""

    def __init__(self, connection: socket.socket, raw: io.RawIOBase):
        super().__init__()
        self.connection, self.raw = connection, raw
        self.deadline: float | None = None
        self.rate = 0.0
        self.late = False  # the last read timed out at the deadline, not after REQUEST_READ_SECONDS without a byte

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            self.late = left <= REQUEST_READ_SECONDS
            if left <= 0:
                raise TimeoutError("the request did not come in time")
            self.connection.settimeout(min(left, REQUEST_READ_SECONDS))
        n = self.raw.readinto(buffer)
        if n and self.deadline is not None and self.rate:
            self.deadline += n / self.rate
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _completion_body(engine: Engine, req: Request, rid: str, result: Result) -> dict:
    n = len(result.texts)
    decode = functools.partial(req.decode, engine.tokenizer)
    logprobs = [_logprobs_body(engine.tokenizer, ids, lps, tops, req.chat, decode) if req.logprobs else None
                for ids, lps, tops in zip(result.token_ids or [[]] * n, result.logprobs or [[]] * n,
                                          result.top or [None] * n, strict=True)]
    if req.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f,
                    **({"logprobs": lp} if req.logprobs else {})}
                   for i, (t, f, lp) in enumerate(zip(result.texts, result.finish_reasons, logprobs, strict=True))]
    else:
        choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": lp}
                   for i, (t, f, lp) in enumerate(zip(result.texts, result.finish_reasons, logprobs, strict=True))]
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
            "model": engine.name, "choices": choices, "usage": _usage(result)}


def _logprobs_body(tokenizer: Tokenizer, ids: list[int], logprobs: list[float | None],
                   tops: list[list[tuple[int, float]] | None] | None, chat: bool, decode=None) -> dict:
    """OpenAI's logprobs object: chat's `content` list, or the completions' parallel lists (tokens,
    token_logprobs, top_logprobs, text_offset). A prompt's first token has no logprob (null), as OpenAI's
    echo gives it; -inf is written as -9999 (JSON has no infinity). Each token is named by its own text;
    `decode` (default: the tokenizer's) makes the returned text `text_offset` counts in (the request's
    `skip_special_tokens`)."""
    decode = decode or tokenizer.decode
    pieces = [tokenizer.decode([i]) for i in ids]

    def value(lp: float | None) -> float | None:
        return lp if lp is None or math.isfinite(lp) else -9999.0

    def alternatives(top: list[tuple[int, float]] | None) -> dict[str, float] | None:
        return None if top is None else {tokenizer.decode([i]): value(v) for i, v in top}

    if chat:
        return {"content": [{"token": t, "logprob": value(lp), "bytes": list(t.encode()),
                             "top_logprobs": [{"token": tokenizer.decode([i]), "logprob": value(v),
                                               "bytes": list(tokenizer.decode([i]).encode())} for i, v in tp or []]}
                            for t, lp, tp in zip(pieces, logprobs, tops or [None] * len(ids), strict=True)]}
    text = decode(ids)
    if "".join(pieces) == text:  # each token decodes on its own to its part of the text
        offsets = [0]
        for piece in pieces[:-1]:
            offsets.append(offsets[-1] + len(piece))
        offsets = offsets[:len(ids)]
    else:  # a character split across tokens: measure each prefix
        offsets = [len(decode(ids[:i])) for i in range(len(ids))]
    return {"tokens": pieces, "token_logprobs": [value(lp) for lp in logprobs],
            "top_logprobs": None if tops is None else [alternatives(tp) for tp in tops], "text_offset": offsets}


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}, "nfe": result.nfe,
            "seconds": round(result.seconds, 6)}


def _chunk(engine: Engine, req: Request, rid: str, index: int, text: str | None, finish: str | None,
           logprobs: dict | None = None) -> dict:
    if req.chat:
        delta = {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "finish_reason": finish,
                  **({"logprobs": logprobs} if req.logprobs else {})}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": int(time.time()),
            "model": engine.name, "choices": [choice]}


def socket_family(host: str) -> socket.AddressFamily:
    """The socket family `make_server` listens with on `host`: IPv6 for an IPv6 address (::1, ::)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_address(host: str, port: int) -> None:
    """Raise the `OSError` that `make_server(…, host, port)` would raise binding its socket (the port is taken,
    the host is no address of this machine), without listening: `serve` asks before a load of minutes, where
    it learnt of a taken port only after it. The server binds as `socketserver` does (SO_REUSEADDR), so a port
    that only lingers in TIME_WAIT passes, and one with a listener does not."""
    with socket.socket(socket_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8080,
                log: Callable[[str], None] | None = None, api_key: str | None = None,
                allowed_origins: Sequence[str] = ()) -> ThreadingHTTPServer:
    """The HTTP server (not started: call `serve_forever`); `port` 0 picks a free one (`server_address`).
    `api_key`: every route but /health asks for `Authorization: Bearer <api_key>` (401 otherwise).
    `allowed_origins`: the origins (scheme://host[:port], or `*`: any) whose browser pages may call the server
    (CORS); none by default: no `Access-Control-*` header is sent, and browsers keep other origins' pages out."""
    origins = {o.lower() for o in allowed_origins}

    class Handler(BaseHTTPRequestHandler):
        server_version = "twotower"
        rbufsize = 0  # `setup` buffers the connection's reads itself, over `_Reads`
        protocol_version = "HTTP/1.1"  # persistent connections: a client's next request needs no new one

        def setup(self) -> None:
            super().setup()
            self._reads = _Reads(self.connection, self.rfile)
            self.rfile = io.BufferedReader(self._reads)
            self.idle = False  # waiting for the connection's next request (`server_close` ends such a wait)
            self._linger = False
            self.server.connections.add(self)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                self.server.connections.discard(self)
                if self._linger:
                    self._linger_close()

        def handle_one_request(self) -> None:
            """The connection's next request, once it begins (`_next_request`), as http.server handles it."""
            self._unread: int | str = 0  # request body not read yet: bytes, or "chunked"
            self._continue = False  # the client waits for a 100 (Continue) before it sends its body
            self._linger = False  # the connection closes with bytes unread: `_linger_close` reads them
            self._probed = False  # `_gone` has sent something to learn whether the client is there
            self._stream: bool | None = None  # an event stream's headers are sent: in chunks (True) or not
            self._answered = False  # an answer's status line is sent (not an interim 100)
            self.route = ""
            self.command, self.request_version, self.requestline, self.headers = "", "HTTP/1.1", "", None
            if not self._next_request():
                self.close_connection = True
                return
            try:  # as http.server's, but a read that times out is answered (`_timed_out`)
                self.raw_requestline = self.rfile.readline(65537)
                if not self.raw_requestline:
                    self.close_connection = True
                elif len(self.raw_requestline) > 65536:
                    self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                elif self.parse_request():  # else it has answered
                    handler = getattr(self, "do_" + self.command, None)
                    if handler is None:
                        self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
                    else:
                        handler()
                        self.wfile.flush()
            except TimeoutError:
                self._timed_out()

        def _timed_out(self) -> None:
            """A read or a write timed out: the client stopped sending its request for REQUEST_READ_SECONDS, or
            sent it too slowly (past its deadline: `_Reads`), both answered with a 408 when no answer has begun;
            or it stopped reading its answer for SEND_SECONDS. The connection closes either way (where the
            request ends, or the answer, is lost)."""
            self.close_connection = True
            if self._answered:
                return
            why = (f"it came too slowly (its request line and headers may take {REQUEST_HEAD_SECONDS:g} s in all, "
                   f"its body {REQUEST_BODY_SECONDS:g} s and a second for every {BODY_MIN_RATE} bytes)"
                   if self._reads.late else f"nothing of it came for {REQUEST_READ_SECONDS:g} s")
            self.log_error("request timed out: %s", why)
            self._unknown_end()
            with contextlib.suppress(OSError):
                self._error(HTTPStatus.REQUEST_TIMEOUT, f"the request did not come in time: {why}; send it whole")

        def _next_request(self) -> bool:
            """Whether the client begins another request: its first byte (or one in `rfile`'s buffer already),
            waited for up to KEEP_ALIVE_SECONDS; not when it closes, goes quiet that long, or the server closes
            (`server_close` shuts an idle connection, which ends the wait)."""
            self.idle = True
            try:
                if self.server.stopping:
                    return False
                self.connection.settimeout(KEEP_ALIVE_SECONDS)
                return bool(self.rfile.peek(1))
            except OSError:  # the wait timed out, or the connection was reset or shut
                return False
            finally:
                self.idle = False  # a request begun: its head must come by a deadline (`_Reads`)
                self._reads.deadline, self._reads.rate = time.monotonic() + REQUEST_HEAD_SECONDS, 0.0

        def _sending(self) -> None:
            """The request is read: from here the socket's timeout is for writes (SEND_SECONDS: a client that
            stops reading its answer), none of which are waited for while the model works (the connection is not
            read while a request waits for its answer but through `_gone`, which does not block)."""
            self._reads.deadline = None
            with contextlib.suppress(OSError):
                self.connection.settimeout(SEND_SECONDS)

        def handle_expect_100(self) -> bool:
            """`Expect: 100-continue`: the 100 goes out when the body is read (`_read_body`), so that a request
            refused on its headers (401, 404, 405, 413) is answered without its body being sent first."""
            self._continue = True
            return True

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
            if log is not None:
                log(f"{self.address_string()} {format % args}")

        def _failed(self, e: BaseException) -> str:
            """A failed request's 500 message, said in the server's log too (the access line alone showed
            only "500"), with the traceback under TWOTOWER_DEBUG=1."""
            message = _failure(e)
            if log is not None:
                log(f"{self.route} · failed: {message}")
            if os.environ.get("TWOTOWER_DEBUG") == "1":
                traceback.print_exception(e)
            return message

        def _report(self, r: Result) -> None:
            if log is not None:
                shared = f" · batch of {r.batch} requests" if r.batch > 1 else ""
                log(f"{self.route} · prompt {r.prompt_tokens} tok ({r.cached_tokens} cached) · {r.completion_tokens} tok "
                    f"· NFE {r.nfe} · {r.completion_tokens / max(r.seconds, 1e-9):.1f} tok/s · {r.seconds:.2f} s{shared}")

        # ------------------------------------------------------------------------------ the request's body

        def _framing(self) -> None:
            """How the request's body is framed (`_unread`): Content-Length bytes, or chunks (Transfer-Encoding:
            chunked, RFC 9112 §7.1). Framing the server cannot follow is a 400 (501: a transfer coding other
            than chunked), and the connection closes after it, since where the next request begins is unknown.
            The head is read: from here its body has a deadline of its own (`_Reads`)."""
            self._reads.deadline, self._reads.rate = time.monotonic() + REQUEST_BODY_SECONDS, BODY_MIN_RATE
            codings, lengths = self.headers.get_all("Transfer-Encoding"), self.headers.get_all("Content-Length") or []
            if codings:
                coding = ", ".join(codings)
                if coding.strip().lower() != "chunked":
                    self._unknown_end()
                    raise BadRequest(f"the transfer coding {coding!r} is not supported: send the body as it is, "
                                     "with a Content-Length, or chunked", HTTPStatus.NOT_IMPLEMENTED)
                if self.request_version < "HTTP/1.1":  # chunks are HTTP/1.1's (RFC 9112 §6.1)
                    self._unknown_end()
                    raise BadRequest("an HTTP/1.0 request cannot be sent in chunks: give a Content-Length")
                self._unread = "chunked"
                if lengths:  # framed by the chunks; a message with both closes its connection (RFC 9112 §6.3)
                    self.close_connection = True
                return
            for length in lengths:  # -1 would read until the client closes; '²' is a digit to str.isdigit
                if not (length.strip().isascii() and length.strip().isdigit()):
                    self._unknown_end()
                    raise BadRequest(f"the Content-Length header {length!r} is not a number of bytes")
            if len({int(length) for length in lengths}) > 1:
                self._unknown_end()
                raise BadRequest(f"the request has Content-Length headers that disagree: {', '.join(lengths)}")
            self._unread = int(lengths[0]) if lengths else 0

        def _unknown_end(self) -> None:
            """The request's end cannot be found: nothing more is read as a request; the connection closes
            after the answer, reading what still comes for a moment first (`_linger_close`)."""
            self._unread, self.close_connection, self._linger = 0, True, True

        def _read_body(self) -> bytes:
            """The request's body, MAX_BODY_BYTES at most (else a 413), after the 100 (Continue) its client
            waits for when it sent `Expect: 100-continue`."""
            if self._unread != "chunked" and self._unread > MAX_BODY_BYTES:
                raise BadRequest(f"the request body is over {MAX_BODY_BYTES >> 20} MiB",
                                 HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            if self._continue:
                self._continue = False
                self.send_response_only(HTTPStatus.CONTINUE)
                self.end_headers()
            if self._unread == "chunked":
                body = self._chunks(MAX_BODY_BYTES)
                if body is None:
                    self._unknown_end()
                    raise BadRequest(f"the request body is over {MAX_BODY_BYTES >> 20} MiB",
                                     HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                self._sending()
                return body
            body, self._unread = self.rfile.read(self._unread), 0
            self._sending()
            return body

        def _chunks(self, limit: int) -> bytes | None:
            """A chunked body (RFC 9112 §7.1: hex size and extensions, data, CRLF; a 0 size; trailers, dropped),
            read to its end; None once it is past `limit` bytes (then the rest is left unread)."""
            body = bytearray()
            self._unread = 0
            while True:
                line = self.rfile.readline(4096)
                size = line.split(b";", 1)[0].strip()
                if not line.endswith(b"\n") or not size or size.strip(b"0123456789abcdefABCDEF"):
                    self._unknown_end()
                    raise BadRequest("the chunked request body is malformed")
                size = int(size, 16)
                if size == 0:
                    break
                if len(body) + size > limit:
                    return None
                data = self.rfile.read(size)
                body += data
                if len(data) < size or self.rfile.readline(4096) not in (b"\r\n", b"\n"):
                    self._unknown_end()
                    raise BadRequest("the chunked request body is malformed")
            while self.rfile.readline(65537).strip():  # trailer fields, up to the empty line
                pass
            return bytes(body)

        def _settle(self) -> None:
            """Before an answer to a request whose body was not read (an error; a GET sent with a body): read it
            and drop it, so that the client, which may be sending it still, reads the answer rather than a reset
            (closing a socket with bytes unread resets the connection), and the connection takes the next
            request. A body over MAX_BODY_BYTES, or one its client has not sent (it waits for a 100), is not
            waited for: the connection closes after the answer (`_linger_close`)."""
            if not self._unread:
                return
            if self._continue or (self._unread != "chunked" and self._unread > MAX_BODY_BYTES):
                self._unknown_end()
                return
            try:
                if self._unread == "chunked":
                    if self._chunks(MAX_BODY_BYTES) is None:
                        self._unknown_end()
                    return
                left, self._unread = self._unread, 0
                while left and (piece := self.rfile.read(min(left, 1 << 16))):
                    left -= len(piece)
            except BadRequest:
                pass  # a malformed chunk: the connection closes (`_unknown_end`), the answer stands
            except TimeoutError:
                self._unknown_end()  # the body stalled: the answer stands, and the connection closes

        def _linger_close(self) -> None:
            """Closing a connection whose client may still be sending (what `_settle` did not read): say so
            (shutdown for writing, after the answer), then read and drop what comes until the client closes or
            LINGER_SECONDS pass, so that the answer is read before the socket closes (a close with bytes unread
            sends a reset, which can reach the client before it has read its answer)."""
            try:
                self.connection.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + LINGER_SECONDS
                while (left := deadline - time.monotonic()) > 0:
                    self.connection.settimeout(left)
                    if not self.connection.recv(1 << 16):
                        break
            except OSError:
                pass

        # ------------------------------------------------------------------------------ answers

        def _send(self, status: int, content_type: str | None, data: bytes, headers: dict[str, str] | None = None) -> None:
            """A whole answer; to a HEAD, its status and headers only (Content-Length still the body's). What is
            left of the request's body is read first (`_settle`); `Connection: close` when the connection ends."""
            self._settle()
            self._sending()
            if engine.closing:  # the server stops: a client should not send its next request here
                self.close_connection = True
            self._answered = True
            self.send_response(status)
            if status != HTTPStatus.NO_CONTENT:
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
            for name, value in {**(headers or {}), **self._cors()}.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":  # in pieces: SEND_SECONDS bounds each, not the whole of a long answer
                for at in range(0, len(data), 1 << 16):
                    self.wfile.write(data[at:at + (1 << 16)])

        def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            if status == HTTPStatus.SERVICE_UNAVAILABLE:
                headers = {"Retry-After": "1", **(headers or {})}  # clients that retry (OpenAI's do) wait a second
            self._send(status, "application/json", json.dumps(body).encode(), headers)

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None,
                   code: str | None = None, param: str | None = None) -> None:
            self._json(status, _error_body(status, message, code, param), headers)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (a method it has no handler for, a request line or headers it cannot
            read) as the API's error objects, not its HTML page; the connection closes after them."""
            message = message or self.responses.get(code, ("error",))[0]
            self.log_error("code %d, message %s", code, message)
            self._unknown_end()
            self._error(code, message)

        def _gone(self) -> bool:
            """Whether the client has left, asked while its request waits for the model. It sends nothing after
            its request, so a socket that reads as ready holds its end of stream: the client closed, or only
            half-closed (shutdown for writing, as `nc -N` does) and still reads. The two are the same FIN to TCP
            until the server sends something: a closed client's system answers it with a reset, after which the
            socket reports a hang-up (POLLHUP, POLLERR) and writes fail. So at the end of stream the server sends,
            once, what the client must read past: in a stream an SSE comment, to an HTTP/1.1 client an interim
            100 (Continue), which every HTTP/1.1 client must skip (RFC 9110 §15.2); the client is gone when the
            socket hangs up (polled again every GONE_POLL_SECONDS; one that half-closed and closes later is seen
            at the next thing written to it: a stream's next event, else its answer). An HTTP/1.0 client may be sent no interim
            answer (§15.2), so its end of stream still counts as leaving: a half-closing HTTP/1.0 client must
            stream. poll, not select: a busy server's sockets have descriptors past select's FD_SETSIZE (1024),
            where select raises ValueError."""
            try:
                if hasattr(select, "poll"):
                    poller = select.poll()
                    poller.register(self.connection, select.POLLIN)
                    ready = poller.poll(0)
                    if ready and ready[0][1] & (select.POLLHUP | select.POLLERR):
                        return True
                else:  # Windows: no poll, and no FD_SETSIZE limit on descriptor numbers there
                    ready, _, _ = select.select([self.connection], [], [], 0)
                if not ready or self.connection.recv(1, socket.MSG_PEEK):
                    return False  # nothing, or bytes (a next request sent early): the client is there
                if self._probed:
                    return False  # sent something, and no hang-up came back: a half-close
                if self._stream is not None:
                    self._write(b": keep-alive\n\n")  # a comment: event stream readers skip it
                elif self.request_version >= "HTTP/1.1":
                    self.send_response_only(HTTPStatus.CONTINUE)
                    self.end_headers()
                else:
                    return True
                self._probed = True
                return False
            except OSError:
                return True

        def _allowed(self) -> bool:
            """With an API key, whether the request carries it (else a 401 is sent)."""
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return True
            self._error(HTTPStatus.UNAUTHORIZED, "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                        code="invalid_api_key")
            return False

        def _cors(self) -> dict[str, str]:
            """The CORS headers of every answer (none without `allowed_origins`): Access-Control-Allow-Origin,
            `*` when any origin is allowed, else the request's Origin when it is one of them (with `Vary: Origin`,
            since the answer then depends on it; so does one to an origin left out, which gets no Allow-Origin)."""
            if not origins:
                return {}
            if "*" in origins:
                return {"Access-Control-Allow-Origin": "*"}
            origin = (self.headers.get("Origin") or "") if self.headers is not None else ""
            if origin.lower() in origins:
                return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            return {"Vary": "Origin"}

        def _foreign(self) -> bool:
            """Whether the request comes from a browser page of an origin not allowed (`_cors`), other than the
            server's own (`Sec-Fetch-Site: same-origin`, as a proxy serving a page beside the API forwards it).
            Such a page may send a POST that needs no preflight (a "simple" request: a text/plain or form body,
            a fetch of mode no-cors), which the browser sends with its Origin; the model would run for it
            although the page cannot read the answer, so it is refused (403) before the body is read."""
            return ("Origin" in self.headers and "Access-Control-Allow-Origin" not in self._cors()
                    and self.headers.get("Sec-Fetch-Site", "").lower() != "same-origin")

        def _preflight(self, allowed: tuple[str, ...]) -> dict[str, str]:
            """A CORS preflight's headers (an OPTIONS with Origin and Access-Control-Request-Method, which a
            browser sends before a cross-origin request and without its API key): the route's methods, the
            headers asked for (its client's own, e.g. the openai package's X-Stainless-*) besides Authorization
            and Content-Type, and how long the answer may be kept."""
            asked = [h.strip() for h in (self.headers.get("Access-Control-Request-Headers") or "").split(",")]
            names = list(CORS_HEADERS) + [h for h in asked if h and h.lower() not in ("authorization", "content-type")
                                          and all(c.isalnum() or c in "-_" for c in h)]
            return {"Access-Control-Allow-Methods": ", ".join(m for m in allowed if m != "OPTIONS"),
                    "Access-Control-Allow-Headers": ", ".join(names), "Access-Control-Max-Age": str(CORS_MAX_AGE)}

        def _dispatch(self) -> None:
            """Every method: the route's own (HEAD: a GET route's answer without its body), OPTIONS (a 204 with
            the methods the route takes; `OPTIONS *`: those of the server; with `allowed_origins`, a CORS
            preflight, which needs no API key), a 405 with `Allow` for any other, a 404 for a path the API lacks.
            The target may be a path or an absolute URL (RFC 9112 §3.2); /models, /completions and
            /chat/completions are the /v1 routes (`ALIASES`)."""
            try:
                self._framing()
            except BadRequest as e:
                self._error(e.status, e.message, code=e.code, param=e.param)
                return
            target = self.path
            if target.lower().startswith(("http://", "https://")):  # absolute-form, as sent to a proxy
                target = "/" + target.split("://", 1)[1].partition("/")[2]
            path = target.partition("?")[0]
            path = "/v1" + path if path.startswith(MODEL_ROUTE[3:]) else path  # /models/{id}, as the aliases
            self.route = route = ALIASES.get(path, path)
            preflight = (bool(origins) and self.command == "OPTIONS" and "Origin" in self.headers
                         and "Access-Control-Request-Method" in self.headers)
            if route not in ("/health", "*") and not preflight and not self._allowed():
                return
            if route == "*":  # the asterisk-form: the server as a whole, for OPTIONS only (RFC 9110 §9.3.7)
                if self.command == "OPTIONS":
                    self._send(HTTPStatus.NO_CONTENT, None, b"", {"Allow": ", ".join(SERVER_METHODS)})
                else:
                    self._error(HTTPStatus.BAD_REQUEST, f"the request target * is for OPTIONS, not {self.command}")
                return
            method = ROUTES.get(route) or ("GET" if route.startswith(MODEL_ROUTE) else None)
            if method is None:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
                return
            allowed = (method, "HEAD", "OPTIONS") if method == "GET" else (method, "OPTIONS")
            if self.command == "OPTIONS":
                self._send(HTTPStatus.NO_CONTENT, None, b"", {"Allow": ", ".join(allowed),
                                                              **(self._preflight(allowed) if preflight else {})})
            elif self.command not in allowed:
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on {route}: use {method}",
                            {"Allow": ", ".join(allowed)})
            elif method == "GET":
                self._get(route)
            elif self._foreign():
                self._error(HTTPStatus.FORBIDDEN, f"a web page of origin {self.headers['Origin']} may not call this "
                            "server: start it with --allowed-origin for that origin to let it")
            else:
                self._post(route)

        do_GET = do_HEAD = do_POST = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = do_TRACE = do_CONNECT = _dispatch

        def _get(self, route: str) -> None:
            if route == "/health":
                self._json(HTTPStatus.OK, {"status": "ok"})
            elif route == "/metrics":
                self._send(HTTPStatus.OK, "text/plain; version=0.0.4", engine.metrics().encode())
            elif route == "/v1/models":
                self._json(HTTPStatus.OK, {"object": "list", "data": [engine.model_object()]})
            elif (wanted := urllib.parse.unquote(route[len(MODEL_ROUTE):])) == engine.name:
                self._json(HTTPStatus.OK, engine.model_object())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no model {wanted!r} here: this server serves {engine.name!r} "
                            "(requests may name any model; they get that one)", code="model_not_found")

        def _post(self, route: str) -> None:
            try:
                try:
                    body = json.loads(self._read_body() or b"null")
                except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
                    raise BadRequest("the request body is not valid JSON") from None
                req = engine.parse(body, chat=route == "/v1/chat/completions")
                if req.ignored and log is not None:
                    log(f"{route} · fields ignored (they change nothing here): {', '.join(map(repr, req.ignored))}")
                engine.check_room()
                rid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
                if req.stream:
                    self._events(req, rid)
                else:
                    result = [r for r in engine.run(req, self._gone, room=True) if isinstance(r, Result)][-1]
                    self._json(HTTPStatus.OK, _completion_body(engine, req, rid, result), {"x-request-id": rid})
                    self._report(result)
            except BadRequest as e:
                self._error(e.status, e.message, code=e.code, param=e.param)
            except ConnectionError:  # the client went away; the sampler was closed with the stream
                self.close_connection = True
            except TimeoutError:  # its body stalled (a 408), or it stopped reading its answer
                raise
            except Exception as e:  # noqa: BLE001 — a failed request must not take the server down
                if self._stream is not None:  # the stream's headers are out: no other answer can follow
                    self.close_connection = True
                else:
                    self._error(HTTPStatus.INTERNAL_SERVER_ERROR, self._failed(e))

        def _write(self, data: bytes) -> None:
            """Bytes of the event stream: a chunk each (HTTP/1.1), or as they are (HTTP/1.0: the stream ends
            with the connection)."""
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._stream else data)

        def _events(self, req: Request, rid: str) -> None:
            self._answered = True
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("x-request-id", rid)  # the reply's id, as the header OpenAI's clients read
            for name, value in self._cors().items():
                self.send_header(name, value)
            self._stream = self.request_version >= "HTTP/1.1"
            if self._stream:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()

            def send(obj) -> None:
                self._write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

            if req.chat:
                for i in range(len(req.prompts)):  # each choice's first chunk names its role
                    send(_chunk(engine, req, rid, i, None, None) | {"choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            try:
                with contextlib.closing(engine.run(req, self._gone, room=True)) as items:  # a client gone frees the model
                    for item in items:
                        if isinstance(item, Piece):
                            for i, text in enumerate(item.deltas):
                                lp = item.logprobs[i] if item.logprobs else None
                                if text or lp is not None:
                                    send(_chunk(engine, req, rid, i, text, None, lp))
                        else:
                            for i, finish in enumerate(item.finish_reasons):
                                send(_chunk(engine, req, rid, i, None, finish))
                            if req.include_usage:
                                send({**_chunk(engine, req, rid, 0, None, None), "choices": [], "usage": _usage(item)})
                            self._report(item)
            except (ConnectionError, TimeoutError):  # the client left, or stopped reading (SEND_SECONDS)
                raise
            except BadRequest as e:  # the server shutting down, or full (`run(room=True)`): the 503 not sent as such
                send(_error_body(e.status, e.message, e.code, e.param))
            except Exception as e:  # noqa: BLE001 — the headers are sent: the error goes into the stream
                send(_error_body(HTTPStatus.INTERNAL_SERVER_ERROR, self._failed(e)))
            send("[DONE]")
            if self._stream:
                self.wfile.write(b"0\r\n\r\n")  # the last chunk

    class Server(ThreadingHTTPServer):
        address_family = socket_family(host)
        # connections the system accepts for the server before it takes them (socketserver's default, 5,
        # reset the rest of a burst of clients: 121 of 192 in a test of 64 at once, before any answer or 503)
        request_queue_size = min(socket.SOMAXCONN, 1024)

        def __init__(self, *args, **kwargs):
            self.handlers: list[threading.Thread] = []  # the request threads, the live ones at least
            self.connections: set[Handler] = set()  # the open connections' handlers
            self.stopping = False  # `server_close` was called: no connection waits for another request
            super().__init__(*args, **kwargs)

        def process_request(self, request, client_address) -> None:
            """As ThreadingMixIn's: each request in a daemon thread (a client that never finishes its request
            cannot keep the process alive), kept in `handlers` for `server_close`."""
            thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                      name="twotower-request", daemon=True)
            self.handlers = [t for t in self.handlers if t.is_alive()] + [thread]
            thread.start()

        def server_close(self) -> None:
            """Stop listening, end the connections that wait for a next request, then wait up to CLOSE_SECONDS
            for the requests being handled to end: at Ctrl-C or SIGTERM `serve` closes the engine first, which
            answers every open request with a 503, and their threads write it before the process exits (as
            daemon threads they would be cut off mid-answer). A client that does not finish its request is not
            waited for longer."""
            super().server_close()
            self.stopping = True
            for handler in list(self.connections):
                if handler.idle:
                    with contextlib.suppress(OSError):
                        handler.connection.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + CLOSE_SECONDS
            for thread in self.handlers:
                thread.join(max(deadline - time.monotonic(), 0))

        def handle_error(self, request, client_address) -> None:
            """A client that left before its answer (an error, or `Engine.close`'s 503, written to a closed
            socket) is no error of the server's: no traceback on its stderr."""
            if isinstance(sys.exc_info()[1], ConnectionError):
                return
            super().handle_error(request, client_address)

    return Server((host, port), Handler)


def base_url(server: ThreadingHTTPServer) -> str:
    """http://HOST:PORT of a server (an IPv6 host in brackets)."""
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def in_background(engine: Engine, host: str = "127.0.0.1", port: int = 0, **options) -> Iterator[str]:
    """`make_server` serving from a daemon thread (a notebook, a benchmark, a test): its base URL, e.g.
    http://127.0.0.1:PORT (`port` 0 picks a free one); the server is shut down on leaving the block. (Its
    loop looks for that every 50 ms: at socketserver's 0.5 s, leaving the block took half a second.)"""
    server = make_server(engine, host, port, **options)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="twotower-http",
                     daemon=True).start()
    try:
        yield base_url(server)
    finally:
        server.shutdown()
        server.server_close()
