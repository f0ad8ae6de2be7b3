"""`twotower serve`: an OpenAI-compatible HTTP server (completions, chat completions) over one model."""

from __future__ import annotations

from typing import Annotated

import typer

from twotower_cli.cli import app, guarded, report_warning
from twotower_cli.commands import options as O
from twotower_cli.errors import TwoTowerError


@app.command(help="Serve a model over HTTP as OpenAI's API does: /v1/completions, /v1/chat/completions, "
             "/v1/models.\n\nThe options are the defaults of every request; a request's own fields (max_tokens, "
             "temperature, top_p, top_k, stop, seed, stream, n, and block_size, steps, threshold, policy, factor, "
             "mode) override them. "
             "Requests with the same mode (mask_diffusion: and block) are sampled as one batch (--max-batch); one that comes while a batch "
             "runs joins it at its next block (continuous batching). A request's prompt and max_tokens together may "
             "not exceed --max-model-len (a 400); one without max_tokens gets --max-new-tokens cut to what fits. "
             "Ctrl-C or SIGTERM answers the open requests with a 503 and waits up to 2 s for those answers to be written.")
@guarded
def serve(
    model: O.Model = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    mode: O.Mode = "mask_diffusion",
    block: O.Block = None,
    steps: O.Steps = None,
    threshold: O.Threshold = 0.8,
    policy: O.Policy = "threshold",
    factor: O.Factor = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens per request unless it sets max_tokens (cut to what fits in --max-model-len).")] = 256,
    max_model_len: Annotated[int | None, typer.Option(help="Tokens of prompt and completion a request may take at most; over it is a 400 (default: the checkpoint's max_position_embeddings, 4096 where config.json has none).")] = None,
    temperature: O.Temperature = 0.0,
    top_k: O.TopK = None,
    top_p: O.TopP = None,
    seed: O.Seed = 0,
    mask_token_id: O.MaskTokenId = None,
    stop: O.Stop = None,
    chat_arg: O.ChatArg = None,
    device: O.Device = None,
    context_device: O.ContextDevice = None,
    denoiser_device: O.DenoiserDevice = None,
    dtype: O.Dtype = "auto",
    compile: O.Compile = False,
    cuda_graphs: O.CudaGraphs = False,
    threads: O.Threads = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="TWOTOWER_API_KEY", help="Ask every request for 'Authorization: Bearer KEY' (as OpenAI clients send their api_key); /health stays open.")] = None,
    conversations: Annotated[int, typer.Option(help="Conversations whose context-tower state is kept between requests (one copy of the state at each one's last user message), so that a client's next turn reads only its new ids even after other clients' requests.")] = 8,
    max_batch: Annotated[int, typer.Option(help="Prompts (rows) in the model at most: requests with the same mode (mask_diffusion: and block) share a batch, a request of more prompts goes in part by part (1: one prompt at a time).")] = 16,
    max_waiting: Annotated[int, typer.Option(help="Refuse a request with a 503 (and Retry-After) while this many wait for the model (0: no limit).")] = 0,
    allowed_origin: Annotated[list[str] | None, typer.Option("--allowed-origin", help="Let browser pages of this origin (scheme://host[:port], e.g. http://localhost:3000; * for any) call the server: CORS headers on every answer, preflights answered (repeatable). Default: none, no CORS headers, so that no web page of another origin can send the server its --api-key, read its answers or make it generate (its POSTs are 403s).")] = None,
    continuous: Annotated[bool, typer.Option("--continuous/--no-continuous", help="Let a request join a running batch between its blocks (ar, mock_ar: tokens), and finished ones leave it; --no-continuous: a request that comes while a batch runs waits for all of it.")] = True,
) -> None:
    from rich.markup import escape

    from twotower_cli.display import err_console
    from twotower_cli.runtime import fetch_model, open_runtime
    from twotower_cli.serve import Engine, base_url, check_address, make_server, template_variables_taken
    from twotower_cli.text import ChatTemplate, find_chat_template, parse_template_args

    defaults = O.sampling_config(locals())  # option errors before the (slow) load
    if max_batch < 1:
        raise TwoTowerError(f"max batch {max_batch} must be at least 1", "try --max-batch 16")
    if max_model_len is not None and max_model_len < 1:
        raise TwoTowerError(f"max model len {max_model_len} must be at least 1", "try --max-model-len 4096")
    if max_waiting < 0:
        raise TwoTowerError(f"max waiting {max_waiting} must be 0 (no limit) or more", "try --max-waiting 64")
    if conversations < 1:
        raise TwoTowerError(f"conversations {conversations} must be at least 1", "try --conversations 8")
    if api_key is not None and not api_key.strip():  # `--api-key "$UNSET"`: an open server, silently
        raise TwoTowerError("--api-key is empty, which would leave the server open to any client",
                            "give the key, or leave --api-key out for a server without one")
    if not 0 <= port <= 65535:
        raise TwoTowerError(f"port {port} is not a port number", "use 0..65535 (0: any free port), e.g. --port 8080")
    origins = [_origin(o) for o in allowed_origin or []]
    variables = parse_template_args(chat_arg or [])
    if taken := template_variables_taken(variables):
        raise TwoTowerError(f"--chat-arg cannot set {taken}: the server sets it for each request",
                            "leave it out (a request may send 'messages')")
    try:  # a taken port or a host not of this machine, before the download and load (minutes), not after
        check_address(host, port)
    except OSError as e:
        raise cannot_listen(e, host, port) from None
    folder = fetch_model(model, mode != "ar", device, dtype, context_device, denoiser_device)
    template = ChatTemplate.load(folder) if find_chat_template(folder) is not None else None
    if template is None and chat_arg:
        raise TwoTowerError("--chat-arg sets chat-template variables, and this model has no chat template",
                            "leave it out (the server answers /v1/completions only)")
    rt = open_runtime(str(folder), need_denoiser=mode != "ar", device=device, dtype=dtype,
                      context_device=context_device, denoiser_device=denoiser_device, compile=compile, threads=threads,
                      cuda_graphs=cuda_graphs)
    defaults = rt.sampling(defaults, mask_token_id=mask_token_id, block=block)
    # requests may set mode and policy themselves: the options are defaults (in ar no denoiser is loaded)
    O.warn_if_options_unused(defaults, O.given("block", "steps", "threshold", "policy", "factor"),
                             requests=rt.backend.twotower is not None)
    if (warning := rt.block_warning(defaults.mode, defaults.block_size)) is not None:
        report_warning(*warning)
    stated = rt.stated_context
    if max_model_len is not None and stated is not None and max_model_len > stated:
        report_warning(f"--max-model-len {max_model_len} is beyond the {stated} tokens this checkpoint is meant for "
                       "(max_position_embeddings); longer sequences run, but the model was not trained on them",
                       f"leave out --max-model-len to use {stated}")
    # --compile, --cuda-graphs: the default mode's steps before the first request (other modes: at their first),
    # for one request alone and for requests batched together
    O.warm_up(rt, defaults, rows=min(2, max_batch))
    name = model or rt.folder.name
    engine = Engine(rt.backend, rt.tokenizer, rt.eos_ids, defaults, name, template, variables, seed,
                    max_batch=max_batch, conversations=conversations, continuous=continuous,
                    max_waiting=max_waiting, max_model_len=max_model_len)
    console = err_console()
    try:  # checked before the load too, and taken again since (or the host changed)
        server = make_server(engine, host, port, log=lambda line: console.print(f"[dim]{escape(line)}[/]",
                                                                               highlight=False, soft_wrap=True),
                             api_key=api_key or None, allowed_origins=origins)
    except OSError as e:
        raise cannot_listen(e, host, port) from None
    bound_port = server.server_address[1]
    chat_note = f"chat template from {template.origin}" if template is not None else "no chat template (completions only)"
    if api_key:
        chat_note += " · API key required"
    elif host not in ("127.0.0.1", "localhost", "::1"):
        report_warning(f"listening on {host} without an API key: whoever reaches port {bound_port} can use the model",
                       "pass --api-key KEY (or set TWOTOWER_API_KEY)")
    if origins:
        chat_note += " · CORS: " + ", ".join(origins)
    try:  # the line first: a signal sent as soon as it is read may arrive while it is still being printed
        console.print(f"serving [bold]{name}[/] ({mode}, block {defaults.block_size}) on "
                      f"[bold]{base_url(server)}/v1[/] · context {engine.max_model_len} tokens · {chat_note} · "
                      "Ctrl-C stops", highlight=False)
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("[dim]stopped[/]")
    finally:
        engine.close()  # requests still running get a 503, and the model's thread ends before the interpreter
        server.server_close()  # then their threads write those 503s (it waits up to serve.CLOSE_SECONDS)


def _origin(value: str) -> str:
    """An --allowed-origin: `*`, or a browser's Origin (scheme://host[:port], no path)."""
    import re

    if value == "*" or re.fullmatch(r"https?://[^/\s?#@]+", value):
        return value
    fixed = re.match(r"https?://[^/\s?#@]+", value)
    raise TwoTowerError(f"--allowed-origin {value!r} is not an origin",
                        f"use scheme://host[:port] as a browser sends it, e.g. --allowed-origin {fixed.group(0)}" if fixed
                        else "use scheme://host[:port] as a browser sends it, e.g. http://localhost:3000, or * for any")


def cannot_listen(e: OSError, host: str, port: int) -> TwoTowerError:
    """The `TwoTowerError` for a socket that cannot be bound on host:port: the hint names --host for an address
    that is not this machine's, else --port."""
    import errno
    import socket

    on_host = isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL
    return TwoTowerError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                         "--host takes an address of this machine: 127.0.0.1, 0.0.0.0 (all), ::1 or :: (IPv6)"
                         if on_host else "pick another --port, or stop what holds this one")
