"""From a model name and device options to a ready sampling backend and tokenizer (generate, bench), and
the Python API on top of it (`twotower_cli.load`, `Runtime.generate`): text in, text out, as the
`generate` command gives it."""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from twotower_cli.config import NemotronHConfig
from twotower_cli.errors import TwoTowerError, check_real, check_seed, check_whole
from twotower_cli.sampler import SamplingConfig
from twotower_cli.text import Tokenizer, end_token_ids, generation_eos_ids
from twotower_cli.towers import LoadedModel, TowerBackend, check_loadable, load_model

DTYPES = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DEFAULT_MODEL = "tiny"


def pick_device(device: str | None, flag: str = "--device") -> torch.device:
    """The torch device `device` names (None or "auto": a GPU where there is one), or a `TwoTowerError` whose
    hint names `flag`, the option it came from."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TwoTowerError(f"unknown device {device!r}", "use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):  # else a load error that blames the checkpoint file
        hint = (f"Apple GPUs lack the float64 the MoE router runs in; use {flag} cpu" if dev.type == "mps"
                else "use cpu, cuda or cuda:N")
        raise TwoTowerError(f"device {device}: twotower runs on CPUs and CUDA GPUs", hint)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TwoTowerError(f"{flag} {device} asked for but CUDA is not available", f"use {flag} cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= (count := torch.cuda.device_count()):
        gpus = f"{count} GPU{'s' * (count != 1)}"
        raise TwoTowerError(f"{flag} {device} asked for but this machine has {gpus}",
                            f"use {flag} cuda (cuda:0)" if count == 1 else f"use cuda:0 to cuda:{count - 1}")
    return dev


def placement(device: str | None, context_device: str | None = None,
              denoiser_device: str | None = None) -> tuple[torch.device, torch.device, torch.device]:
    """(the device, the context tower's, the denoiser's) from the commands' --device, --context-device and
    --denoiser-device: a tower without its own device goes on --device."""
    dev = pick_device(device)
    return (dev, pick_device(context_device, "--context-device") if context_device else dev,
            pick_device(denoiser_device, "--denoiser-device") if denoiser_device else dev)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise TwoTowerError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    chosen = DTYPES[dtype]
    if chosen is None:  # auto: bf16 on GPUs, fp32 on CPUs (where bf16 matmuls are slow and less exact)
        chosen = torch.bfloat16 if device.type == "cuda" else torch.float32
    return chosen


STREAM_OPTIONS = frozenset({"chat", "system", "template_args", "mode", "max_new_tokens", "block", "steps", "threshold",
                            "policy", "factor", "temperature", "top_k", "top_p", "seed", "stop", "stop_texts",
                            "mask_token_id"})


def _check_chat_prompt(item: object) -> None:
    """With chat=True a prompt is a string (a user message) or a non-empty list of {"role": str, "content": str}
    dicts, as generate --chat's JSONL requires: others rendered without a word, or failed deep in the template
    with a TypeError or KeyError."""
    if isinstance(item, str):
        return
    if not (isinstance(item, list | tuple) and item and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in item)):
        raise TwoTowerError(f"with chat=True a prompt is a string or a non-empty list of {{role, content}} strings, "
                            f"not {item!r:.60}", 'e.g. [{"role": "user", "content": "Hi"}]')


@dataclass
class Completion:
    """One prompt's continuation (`Runtime.generate`), as `generate --json` reports it: the text (before the
    first end id and stop text), the ids that text is made of, why it ended (eos, length, stop) and the
    forwards it took part in; and how many ids the model read for the prompt (a chat template's included)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    nfe: int
    prompt_tokens: int


@dataclass
class Runtime:
    loaded: LoadedModel
    backend: TowerBackend
    tokenizer: Tokenizer
    cfg: NemotronHConfig
    folder: Path
    eos_ids: list[int]  # what ends a sequence: config.json's eos_token_id, then generation_config.json's
    # held by the call using the model's cache: one call at a time (a stream holds it until it ends or closes)
    _busy: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @contextlib.contextmanager
    def _one_call(self) -> Iterator[None]:
        """The model's cache for one call, or a `TwoTowerError` while another holds it: a stream paused between
        its pieces, or another thread. Both used the same cache at once and gave wrong text without a word."""
        if not self._busy.acquire(blocking=False):
            raise TwoTowerError("this Runtime is running another call (a stream not yet finished or closed, or "
                                "another thread): it holds one model cache, for one call at a time",
                                "finish or close() the stream first; for concurrent clients run `twotower serve`, "
                                "or load a Runtime per thread")
        try:
            yield
        finally:
            self._busy.release()

    def __repr__(self) -> str:  # one line in a notebook, not every module of both towers
        towers = "context tower + denoiser" if self.backend.twotower is not None else "context tower only"
        dtype = str(self.backend.ar.lm_head.weight.dtype).removeprefix("torch.")
        return (f"Runtime({self.folder.name}: {self.cfg.num_hidden_layers} layers {self.cfg.pattern!r}, vocabulary "
                f"{self.cfg.vocab_size}, block {self.cfg.block_size}, {towers}, {self.backend.device} {dtype})")

    def sampling(self, settings: SamplingConfig, *, mask_token_id: int | None = None,
                 block: int | None = None) -> SamplingConfig:
        """`settings` completed from this checkpoint and validated against its vocabulary: its mask id
        unless the user gave `mask_token_id`, the block its denoiser was trained with unless the user gave
        `block`, and its pad id."""
        changes: dict = {}
        if mask_token_id is None:
            changes["mask_token_id"] = self.cfg.mask_token_id
        if block is None:
            changes["block_size"] = self.cfg.block_size
        if self.cfg.pad_token_id is not None:
            changes["pad_token_id"] = int(self.cfg.pad_token_id)
        settings = dataclasses.replace(settings, **changes)
        settings.validate(self.backend.vocab_size)
        return settings

    def generate(self, prompt: str | list, *, chat: bool = False, system: str | None = None,
                 template_args: dict | None = None, mode: str = "mask_diffusion", max_new_tokens: int = 128,
                 block: int | None = None, steps: int | None = None, threshold: float = 0.8,
                 policy: str = "threshold", factor: float = 1.0, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop: tuple[int, ...] = (),
                 stop_texts: tuple[str, ...] = (), mask_token_id: int | None = None,
                 batch_size: int = 16) -> Completion | list[Completion]:
        """Continue `prompt` (one `Completion`) or each of a list of prompts (a list, in order), with the
        settings of the `generate` command's options of the same names and its results for them (one
        prompt alone; several with continuous batching, `batch_size` at a time). The defaults are the
        command's: greedy, NVIDIA's threshold 0.8, the checkpoint's block. Bad settings raise
        `TwoTowerError`.

        `chat=True` (`generate --chat`): each prompt goes through the checkpoint's chat template, a string
        as a user message, a list of {"role", "content"} dicts as a whole conversation (one such list is
        one prompt); `system` first if given; `template_args` are the template's variables (`--chat-arg`,
        e.g. {"enable_thinking": False})."""
        from twotower_cli import sampler as S
        from twotower_cli.batching import Continuous, run_in_order

        check_whole("batch_size", batch_size)
        if batch_size < 1:
            raise TwoTowerError(f"batch size {batch_size} must be at least 1", "try batch_size=16")
        if isinstance(prompt, list | tuple) and not prompt:
            return []  # no prompts, no completions (max() of no lengths was a ValueError)
        one, ids, settings, cutter, gen = self._prepare(
            prompt, chat=chat, system=system, template_args=template_args, mode=mode, max_new_tokens=max_new_tokens,
            block=block, steps=steps, threshold=threshold, policy=policy, factor=factor, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop=stop, stop_texts=stop_texts, mask_token_id=mask_token_id)
        with self._one_call():
            if one:
                generations = S.run(self.backend, ids, settings, self.eos_ids, gen, cutter.until).generations
            else:
                running = Continuous(self.backend, settings, self.eos_ids, gen, cutter.until)
                generations = [g for _, g, _ in run_in_order(running, ids, width=batch_size)]
        out = []
        for g in generations:
            text, cut = cutter.final(g.token_ids)
            out.append(Completion(text, cutter.ids_before(g.token_ids, text) if cut else g.token_ids,
                                  g.finish_reason, g.nfe, len(g.prompt_ids)))
        return out[0] if one else out

    def stream(self, prompt: str | list[dict], **options) -> Iterator[str]:
        """One prompt's continuation as it becomes final: a piece of text after each block (ar, mock_ar:
        token) that committed some, never one to take back (an ending that may begin a stop text, or an
        unfinished character, waits for the next). `options`: `generate`'s (but batch_size: one prompt); the
        pieces add up to its text. The stream holds the runtime until it ends or is closed."""
        from twotower_cli import sampler as S

        if unknown := sorted(set(options) - STREAM_OPTIONS):
            raise TwoTowerError(f"stream takes no option {unknown[0]!r}",
                                "its options are generate's (one prompt: no batch_size): " + ", ".join(sorted(STREAM_OPTIONS)))
        one, ids, settings, cutter, gen = self._prepare(prompt, **options)
        if not one:
            raise TwoTowerError("stream takes one prompt", "call it for each, or use generate for several")
        with self._one_call():
            diffusion, mask = settings.mode == "mask_diffusion", settings.mask_token_id
            so_far: list[int] = []
            sent = ""
            for ev in S.generate(self.backend, ids, settings, self.eos_ids, gen, cutter.until):
                if isinstance(ev, S.BlockDone):
                    row = ev.tokens[0].tolist()
                    so_far += row[:row.index(mask)] if diffusion and mask in row else row  # slots left masked: none
                    safe = cutter.settled(so_far)
                elif isinstance(ev, S.Finished):
                    safe = cutter.final(ev.generations[0].token_ids)[0]
                else:
                    continue
                if len(safe) > len(sent) and safe.startswith(sent):
                    yield safe[len(sent):]
                    sent = safe

    def _prepare(self, prompt, *, chat: bool = False, system: str | None = None, template_args: dict | None = None,
                 mode: str = "mask_diffusion", max_new_tokens: int = 128, block: int | None = None,
                 steps: int | None = None, threshold: float = 0.8, policy: str = "threshold", factor: float = 1.0,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop: tuple[int, ...] = (), stop_texts: tuple[str, ...] = (), mask_token_id: int | None = None):
        """`generate`'s options checked and turned into (one prompt or a list, the prompts' ids, the sampling
        settings, the stop texts' `StopTexts`, the seeded generator)."""
        from twotower_cli import sampler as S
        from twotower_cli.text import StopTexts, render_chats

        if isinstance(prompt, dict):  # one message: read as a list, it was its keys, two prompts "role" and "content"
            raise TwoTowerError("a prompt is a string, a list of strings, or with chat=True a list of messages "
                                "(a conversation); not one message dict", "pass [message] with chat=True")
        if not isinstance(prompt, str | list | tuple) or (isinstance(prompt, list | tuple) and not prompt):
            raise TwoTowerError(f"a prompt is a string or a non-empty list, not {type(prompt).__name__} {prompt!r:.40}",
                                'e.g. rt.generate("ROMEO.")')
        one = isinstance(prompt, str) or (chat and isinstance(prompt[0], dict))
        items = [prompt] if one else list(prompt)
        if chat:
            for item in items:
                _check_chat_prompt(item)
        stop = (stop,) if isinstance(stop, int) else stop
        stop_texts = (stop_texts,) if isinstance(stop_texts, str) else stop_texts  # one, not its characters
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in stop):
            raise TwoTowerError(f"stop takes token ids (integers), not {stop!r:.60}", "e.g. stop=[2] or stop=2")
        if not all(isinstance(t, str) for t in stop_texts):  # (an empty one: StopTexts says so)
            raise TwoTowerError(f"stop_texts takes strings, not {stop_texts!r:.60}", 'e.g. stop_texts=["\\n\\n"]')
        for name, value in (("max_new_tokens", max_new_tokens), ("seed", seed), ("block", block), ("steps", steps),
                            ("top_k", top_k), ("mask_token_id", mask_token_id)):
            check_whole(name, value)
        for name, value in (("threshold", threshold), ("factor", factor), ("temperature", temperature),
                            ("top_p", top_p)):
            check_real(name, value)
        if template_args is not None and not isinstance(template_args, dict):
            raise TwoTowerError(f"template_args is a dict of the template's variables, not {template_args!r:.40}",
                                'e.g. template_args={"enable_thinking": False}')
        if (system is not None or template_args) and not chat:
            raise TwoTowerError("system and template_args shape a chat template", "pass chat=True")
        if "messages" in (template_args or {}):
            raise TwoTowerError("template_args cannot set messages: the prompts are the messages", "leave it out")
        if not chat and not all(isinstance(item, str) for item in items):
            raise TwoTowerError("a prompt that is not text needs chat=True (a list of messages is a conversation)",
                                "pass chat=True, or give strings")
        texts = render_chats(self.folder, items, system, dict(template_args or {})) if chat else items
        check_seed(seed, "seed")
        settings = SamplingConfig(mode=mode, block_size=1 if block is None else block, steps=steps,
                                  threshold=threshold, policy=policy, factor=factor, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  mask_token_id=3 if mask_token_id is None else mask_token_id, stop_ids=tuple(stop))
        settings = self.sampling(settings, mask_token_id=mask_token_id, block=block)
        if mode != "ar" and self.backend.twotower is None:
            raise TwoTowerError(f"{mode} needs the denoiser, and this runtime loaded the context tower only",
                                "load it with denoiser=True, or use mode='ar'")
        ids = [self.tokenizer.encode(t, add_special_tokens=not chat) for t in texts]
        if any(not p for p in ids):
            raise TwoTowerError("a prompt encodes to no tokens", "give some text to continue")
        for said in (self.block_warning(mode, settings.block_size, "block"),
                     self.length_warning(max(map(len, ids)), max_new_tokens, "max_new_tokens")):
            if said is not None:  # what the commands print as a Warning: line
                warnings.warn(f"{said[0]} (hint: {said[1]})", UserWarning, stacklevel=3)
        cutter = StopTexts(stop_texts, self.tokenizer.decode, S.stop_set(settings, self.eos_ids), settings.block_size)
        return one, ids, settings, cutter, torch.Generator().manual_seed(seed)

    @property
    def stated_context(self) -> int | None:
        """The tokens of a sequence config.json says the model is meant for (max_position_embeddings), if it
        says; attention has no positions, so longer sequences run, but the model was not trained on them."""
        stated = self.cfg.raw.get("max_position_embeddings")
        return stated if isinstance(stated, int) and not isinstance(stated, bool) else None

    def beyond_context(self, reach: int) -> str | None:
        """How far past the stated context (`stated_context`) a sequence of `reach` tokens goes, as the end of a
        warning ("N tokens, beyond the M this checkpoint is meant for …"); None if it does not."""
        stated = self.stated_context
        if stated is None or reach <= stated:
            return None
        return (f"{reach} tokens, beyond the {stated} this checkpoint is meant for (max_position_embeddings); "
                "longer sequences run, but the model was not trained on them")

    def length_warning(self, prompt_tokens: int, max_new_tokens: int,
                       option: str = "--max-new-tokens") -> tuple[str, str] | None:
        """(message, hint) when a prompt of `prompt_tokens` and `max_new_tokens` reach beyond the
        max_position_embeddings config.json states (attention has no positions: they run, untrained), else
        None. `serve` refuses such requests instead (`--max-model-len`). `option`: what the caller calls it."""
        beyond = self.beyond_context(prompt_tokens + max_new_tokens)
        if beyond is None:
            return None
        room = self.stated_context - prompt_tokens
        return (f"prompt and {option} reach {beyond}",
                f"use {option}{' ' if option.startswith('--') else '='}{room}" if room > 0 else "shorten the prompt")

    def block_warning(self, mode: str, block: int, option: str = "--block") -> tuple[str, str] | None:
        """(message, hint) when `mode` samples by block diffusion with blocks larger than the denoiser was
        trained with (NVIDIA: that degrades badly), else None. `option`: what the caller calls the block."""
        trained = self.cfg.block_size
        if mode != "mask_diffusion" or block <= trained:
            return None
        source = "config.json" if "block_size" in self.cfg.twotower else "NVIDIA's release"
        return (f"block {block} is larger than the block this denoiser was trained with ({trained}, "
                f"{source}); larger blocks give much worse text", f"leave out {option} to use {trained}")


def fetch_model(model: str | None, need_denoiser: bool | None, device: str | None = None, dtype: str = "auto",
                context_device: str | None = None, denoiser_device: str | None = None) -> Path:
    """The checkpoint folder for a model name (alias, hub id, folder or .safetensors file; None is the embedded
    default), downloaded if it is a hub model not in the cache — after `check_loadable` on its headers read
    from the hub (`remote.header_folder`, a few MB), so that a model that cannot load here (not a TwoTower
    where the mode needs one, weights unlike their config, no room on a device) fails in seconds, not after a
    download of tens of GB. `need_denoiser=None`: as the checkpoint is (bench and eval)."""
    from twotower_cli.hub import local_or_hub, resolve

    if model is not None and not (isinstance(model, str | Path) and str(model)):  # the CLI refuses -m "" too
        raise TwoTowerError(f"the model is a name or a path, not {model!r:.40}",
                            "pass a checkpoint folder, a hub id or an alias, or None for the embedded tiny model")
    name = str(model) if model is not None else DEFAULT_MODEL
    repo_id = local_or_hub(name)[1]
    if repo_id is not None:
        from twotower_cli.remote import NOT_DOWNLOADED, header_folder

        dev, ctx, den = placement(device, context_device, denoiser_device)
        with header_folder(repo_id, as_path=repo_id == name, note=NOT_DOWNLOADED) as (folder, got):
            check_loadable(folder, need_denoiser=need_denoiser, dtype=pick_dtype(dtype, ctx), device=dev,
                           context_device=ctx, denoiser_device=den, file_sizes=got.file_sizes)
    return checkpoint_folder(resolve(name))


def checkpoint_folder(path: Path) -> Path:
    """The folder of a resolved checkpoint (a folder, or a .safetensors file in one); it must hold config.json."""
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():  # before the tokenizer or the weights are looked for
        raise TwoTowerError(f"{folder} is not a checkpoint folder: no config.json in it",
                            "a checkpoint folder holds config.json, safetensors weights and the tokenizer files")
    return folder


def open_runtime(model: str | None, need_denoiser: bool, device: str | None = None, dtype: str = "auto",
                 context_device: str | None = None, denoiser_device: str | None = None,
                 compile: bool = False, threads: int | None = None, cuda_graphs: bool = False) -> Runtime:
    """Resolve the model name (alias, hub id in the cache, or folder), load it, and load its tokenizer.
    `compile`: torch.compile the decode and block steps (`TowerBackend.compile`). `threads`: CPU threads for
    torch (default: torch's own choice, one per core). `cuda_graphs`: replay the steps of the towers that run
    on a GPU from CUDA graphs (`TowerBackend`); needs one of them there."""
    if threads is not None:
        check_whole("threads", threads)
        if threads < 1:
            raise TwoTowerError(f"threads {threads} must be at least 1", "try --threads 1")
        if threads >= 2**31:  # torch takes a C int
            raise TwoTowerError(f"threads {threads} is more than torch can take", "try --threads 1")
        torch.set_num_threads(threads)
    dev, ctx, den = placement(device, context_device, denoiser_device)  # option errors before any download
    tdtype = pick_dtype(dtype, ctx)
    if cuda_graphs and ctx.type != "cuda" and den.type != "cuda":
        where = f"both would run on {den}" if ctx == den else f"they would run on {ctx} and {den}"
        raise TwoTowerError(f"--cuda-graphs needs a tower on a GPU; {where}",
                            "use --device cuda (or --context-device / --denoiser-device cuda:N), or drop --cuda-graphs")
    folder = fetch_model(model, need_denoiser, device, dtype, context_device, denoiser_device)
    tokenizer = Tokenizer(folder)
    generation_eos = generation_eos_ids(folder)  # read before the (slow) load: a bad file fails fast
    loaded = load_model(folder, need_denoiser=need_denoiser, dtype=tdtype, device=dev,
                        context_device=ctx, denoiser_device=den, check_memory=True)
    backend = TowerBackend(loaded.twotower, loaded.ar)
    if compile:
        backend.compile()
    backend.graphs = cuda_graphs
    return Runtime(loaded, backend, tokenizer, loaded.cfg, folder, end_token_ids(loaded.cfg.eos_token_ids, generation_eos))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
