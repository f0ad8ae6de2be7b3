"""Tokenizer loading and prompt reading: the boundary between text and ids for the commands."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from twotower_cli.errors import TwoTowerError, check_files, lone_surrogate_at

_CUT_WINDOW = 1024  # characters on each side of a cut that `Tokenizer._cuts_cleanly` encodes
_CUT_TRIES = 8  # candidate cuts of each kind tried per piece


class Tokenizer:
    """A checkpoint's `tokenizer.json` through the `tokenizers` library; encode adds no special tokens
    beyond what the tokenizer's own post-processor adds."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise TwoTowerError(f"no tokenizer.json in {folder}",
                                "copy the tokenizer files from the source model into the checkpoint folder")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions on malformed files
            raise TwoTowerError(f"cannot read {path}: {e}", "the tokenizer file may be corrupt") from None
        # a tokenizer.json saved with truncation or padding on (a fine-tuning script's max_length) would cut
        # every prompt and corpus document short, or pad it, without a word: ids are the whole text's here
        self._tok.no_truncation()
        self._tok.no_padding()
        # tokenizer_config.json's special tokens are read as themselves in text, as transformers registers them
        # at load; only those in the vocabulary (a new id would be past the model's embeddings)
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        missing = [t for t in special_tokens(Path(folder)).values()
                   if t not in added and self._tok.token_to_id(t) is not None]
        if missing:
            from tokenizers import AddedToken

            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """A hash of the vocabulary (every token and its id, added tokens included): two tokenizers with the
        same fingerprint map text to the same ids, whatever their files' formatting."""
        import hashlib

        vocab = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; `add_special_tokens=False` skips the post-processor's additions (a chat template
        writes its own). Special tokens written in the text (`<|im_start|>`) are read as themselves."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` of each text (special tokens added as `encode` adds them), on all cores."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_stream(self, f: TextIO, piece_chars: int = 1 << 18, batch: int = 16) -> Iterator[list[int]]:
        """`encode(f.read())` in consecutive lists of ids, reading `f` a piece of `piece_chars` characters at
        a time and encoding `batch` pieces together (`encode_batch`: all cores), so that at most about
        (batch + 1) · piece_chars characters of the text are held at once, whatever its length, where cuts
        pass (below). Nothing for an empty text.

        A piece ends where cutting the text changes no token: at the end of a line (else before a space)
        where a window of text around the cut encodes to the ids of its two sides encoded apart
        (`_cuts_cleanly`). That check is local, as what a tokenizer does across a cut is: two newlines
        merged into one vocabulary entry, punctuation and the newlines after it kept as one pre-token, a
        space prefixed to the first word of a text all fail it (tested). Where no cut passes within a
        piece, the next read is held with it and searched in turn (each read is searched once): text is
        held until a cut passes, the whole text if none does (as for a tokenizer whose normalizer puts a
        string before every text), with work linear in its length (tested). The post-processor's special
        tokens (a BOS, an EOS) are added once around the whole text; a post-processor that does more than
        wrap a text in fixed tokens makes the text be read and encoded whole."""
        affixes = self._affixes
        if affixes is None:
            if text := f.read():
                yield self.encode(text)
            return
        prefix, suffix = affixes
        group: list[str] = []
        started = False
        for piece in self._pieces(f, piece_chars):
            if not started:
                yield prefix
                started = True
            group.append(piece)
            if len(group) == batch:
                yield from self.encode_batch(group, add_special_tokens=False)
                group = []
        if group:
            yield from self.encode_batch(group, add_special_tokens=False)
        if started:
            yield suffix

    def _pieces(self, f: TextIO, piece_chars: int) -> Iterator[str]:
        """The text of `f` in consecutive pieces of about `piece_chars` characters that encode apart to what
        the whole encodes to (`encode_stream`). The reads since the last cut are held as read and joined
        once, at the next cut; each read is searched once, with the characters around it that a check
        needs: the work is linear in the text's length even where no cut is ever found."""
        overlap = max(1, min(_CUT_WINDOW, piece_chars // 4))
        held: list[str] = []  # the text read since the last cut
        size = 0  # its length
        tail = ""  # its end: the last read and up to 2 · overlap characters before it
        while chunk := f.read(piece_chars):
            held.append(chunk)
            size += len(chunk)
            tail = tail[-2 * overlap:] + chunk
            # cuts up to `overlap` characters before the previous read's end were searched then
            if cut := self._cut(tail, overlap, len(tail) - len(chunk) - overlap):
                cut += size - len(tail)
                text = "".join(held)
                piece, rest = text[:cut], text[cut:]
                del text
                held, size, tail = [rest], len(rest), rest[-2 * overlap:]
                yield piece
        if held:
            yield "".join(held)

    def _cut(self, text: str, overlap: int, searched: int = 0) -> int:
        """The last place past `searched` (and 0) in `text`, with at least `overlap` characters after it, where
        it can be cut without changing a token: after a newline, else before a space; 0 if none of the
        last `_CUT_TRIES` of each passes."""
        first, end = max(searched, 0) + 1, len(text) - overlap
        for sep, after in (("\n", 1), (" ", 0)):
            limit = end + 1 - after
            for _ in range(_CUT_TRIES):
                i = text.rfind(sep, first - after, limit)
                if i < 0:
                    break
                if self._cuts_cleanly(text, i + after, overlap):
                    return i + after
                limit = i
        return 0

    def _cuts_cleanly(self, text: str, cut: int, overlap: int) -> bool:
        """Whether the `overlap` characters on each side of `cut` encode together to the ids of each side
        encoded alone. A tokenizer's merges across the cut are local (a pre-token, or a BPE word of
        whitespace and the word after it); each side must hold a character that is not whitespace, so that
        a run of whitespace across the cut (which some pre-tokenizers keep as one piece) ends inside the
        window instead of being cut short by it."""
        left, right = text[max(0, cut - overlap):cut], text[cut:cut + overlap]
        if not left.strip() or not right.strip():
            return False
        return self.encode(left + right, False) == self.encode(left, False) + self.encode(right, False)

    @functools.cached_property
    def _affixes(self) -> tuple[list[int], list[int]] | None:
        """The ids the post-processor puts before and after a text's own (a BOS, an EOS; none for most
        decoder tokenizers), or None where it does anything else (not the same around two texts)."""
        found = set()
        for probe in ("a", "Hello, world.\n\n  x"):
            bare, full = self.encode(probe, False), self.encode(probe, True)
            starts = [i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare]
            found.add((tuple(full[:starts[0]]), tuple(full[starts[0] + len(bare):])) if starts else None)
        only = found.pop() if len(found) == 1 else None
        return None if only is None else (list(only[0]), list(only[1]))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class ChatTemplate:
    """A checkpoint's chat template, rendered as transformers' `apply_chat_template(..., tokenize=False)` does:
    Jinja2's immutable sandbox with trim_blocks, lstrip_blocks and loop controls; `raise_exception(msg)`,
    `strftime_now(fmt)` and a `tojson` that leaves non-ASCII and HTML characters alone; in scope the
    tokenizer's special tokens (`bos_token`, `eos_token`, ...), `tools` and `documents` (None unless given)
    and the caller's variables (`enable_thinking`, ...). Encode the result with
    `Tokenizer.encode(text, add_special_tokens=False)`, as transformers does: the template writes them.

    Where it is found, first match: `chat_template.jinja`, `chat_template.json` ({"chat_template": ...}),
    the `chat_template` of `tokenizer_config.json`: a string, or named templates ([{name, template}]), of
    which "tool_use" renders a conversation given `tools` where there is one, and "default" the others."""

    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str], origin: str):
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:  # torch depends on jinja2, so this is a broken environment
            raise TwoTowerError("chat templates need jinja2", "pip install jinja2") from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            from datetime import datetime

            return datetime.now().strftime(fmt)

        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                  extensions=["jinja2.ext.loopcontrols"])
        self._env.filters["tojson"] = tojson
        self._env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        self._errors = jinja2.exceptions.TemplateError
        self.templates, self.special_tokens, self.origin = dict(templates), dict(special_tokens), origin
        self._compiled: dict = {}
        self._compile("default")  # a broken template fails at load, before the model does

    def _compile(self, name: str):
        if name not in self._compiled:
            try:
                self._compiled[name] = self._env.from_string(self.templates[name])
            except self._errors as e:
                raise TwoTowerError(f"cannot read the chat template in {self.origin}: {e}", "fix the template") from None
        return self._compiled[name]

    @classmethod
    def load(cls, folder: Path) -> ChatTemplate:
        found = find_chat_template(Path(folder))
        if found is None:
            raise TwoTowerError(f"{folder} has no chat template",
                                "drop --chat (a base model continues text), or add chat_template.jinja")
        templates, origin = found
        return cls(templates, special_tokens(Path(folder)), str(origin))

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The conversation as the model reads it; `variables` reach the template (`tools=[...]` too)."""
        name = "tool_use" if variables.get("tools") is not None and "tool_use" in self.templates else "default"
        try:
            # tools and documents are always defined (None unless given), as transformers passes them
            return self._compile(name).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **{**self.special_tokens, "tools": None, "documents": None, **variables})
        except self._errors as e:
            raise TwoTowerError(f"the chat template ({self.origin}) refused the conversation: {e}",
                                "check --system and --chat-arg") from None


def find_chat_template(folder: Path) -> tuple[dict[str, str], Path] | None:
    """The checkpoint's chat templates by name ("default", and others for named templates) and the file they
    come from, or None (see `ChatTemplate` for where it looks)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}, jinja_file
    json_file = folder / "chat_template.json"
    if isinstance(source := _read_json(json_file).get("chat_template"), str):
        return {"default": source}, json_file
    config_file = folder / "tokenizer_config.json"
    source = _read_json(config_file).get("chat_template")
    if isinstance(source, str):
        return {"default": source}, config_file
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        named = {k: v for k, v in named.items() if isinstance(k, str) and isinstance(v, str)}
        if "default" not in named:
            raise TwoTowerError(f"{config_file} has named chat templates but no 'default' "
                                f"({', '.join(named) or 'none readable'})", "add a template named default")
        return named, config_file
    return None


def generation_eos_ids(folder: Path) -> list[int]:
    """generation_config.json's `eos_token_id` (one id or a list; [] without the file). transformers'
    `generate` stops on these: a chat model lists its end-of-turn token there (`<|im_end|>`, 11 for Nemotron,
    spec §1), which config.json's `eos_token_id` may lack."""
    path = folder / "generation_config.json"
    raw = _read_json(path).get("eos_token_id")
    ids = raw if isinstance(raw, list) else [] if raw is None else [raw]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TwoTowerError(f"eos_token_id {raw!r} in {path} is not a token id or a list of them",
                            "fix or remove generation_config.json")
    return ids


def end_token_ids(config_ids: list[int], generation_ids: list[int]) -> list[int]:
    """What ends a sequence: config.json's eos ids, then generation_config.json's others (`generation_eos_ids`)."""
    return config_ids + [i for i in generation_ids if i not in config_ids]


def special_tokens(folder: Path) -> dict[str, str]:
    """tokenizer_config.json's named special tokens ({"bos_token": "<s>", ...}; {} without the file)."""
    config = _read_json(folder / "tokenizer_config.json")
    named = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items() if k.endswith("_token")}
    return {k: v for k, v in named.items() if isinstance(v, str) and v}


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, {} if the file is absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TwoTowerError(f"{path} is not valid JSON: {e}", "fix or remove the file") from None
    if not isinstance(value, dict):
        raise TwoTowerError(f"{path} is not a JSON object", "fix or remove the file")
    return value


def render_chats(folder: Path, items: list, system: str | None, variables: dict) -> list[str]:
    """generate --chat: each prompt as the model reads it, through the checkpoint's chat template. A string
    is a user message, a list a whole conversation; `system`, if given, goes first."""
    template = ChatTemplate.load(folder)
    head = [] if system is None else [{"role": "system", "content": system}]
    return [template.render(head + ([{"role": "user", "content": item}] if isinstance(item, str) else item),
                            **variables) for item in items]


def parse_template_args(items: list[str]) -> dict:
    """--chat-arg KEY=VALUE items → {KEY: VALUE}, VALUE read as JSON (false, 3, "x", [..]) and else as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise TwoTowerError(f"--chat-arg {item!r} is not KEY=VALUE", "e.g. --chat-arg enable_thinking=false")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def cut_at_stop_text(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` before the first place one of the stop strings `stops` begins, and whether one was found: a
    stop string ends the text and is not part of it (OpenAI's `stop`, `generate --stop-text`)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def hold_back(text: str, stops: Sequence[str]) -> str:
    """`text` without an unfinished multi-byte character at its end, nor an ending that could be the start
    of a stop string (so streamed text never has to be taken back)."""
    text = text.rstrip("\ufffd")
    keep = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    return text[:keep]


class StopTexts:
    """`--stop-text`: texts that end a sequence once it writes them, and the end ids that end it before.

    `final(ids)` is the text of generated ids, cut before the first end id and the first stop text, and
    whether a stop text cut it; `until` is what the sampler asks after each block (ar, mock_ar: each token)
    (None without stop texts); `ids_before` and `ids_through` are the generated ids that make the text
    before the stop text, and the ids up to the one in which it ends; `settled(ids)` is the text a stream
    can send of ids still being generated."""

    def __init__(self, texts: Sequence[str], decode, end_ids: set[int], block_size: int):
        self.texts, self.decode, self.end_ids = self.check(texts), decode, set(end_ids)
        # A stop text first written in a block ends in that block's tokens, so the tokens that could hold it
        # are the last block and, before it, as many as its characters (up to 4 tokens a character where a
        # tokenizer spells one in bytes): decoding only those keeps the check from growing with the text.
        self._window = block_size + 4 * (max(map(len, self.texts), default=0) + 2)

    @staticmethod
    def check(texts: Sequence[str] | None) -> list[str]:
        """The stop texts as a list, or a `TwoTowerError` for an empty one (before a slow load)."""
        if "" in (texts := list(texts or [])):
            raise TwoTowerError("--stop-text '' would end every sequence before its first token", "give some text")
        return texts

    def _end(self, ids: list[int]) -> list[int]:
        """`ids` before the first end id."""
        from twotower_cli.sampler import first_stop

        cut = first_stop(ids, self.end_ids)
        return ids if cut is None else ids[:cut]

    def final(self, ids: list[int]) -> tuple[str, bool]:
        return cut_at_stop_text(self.decode(self._end(ids)), self.texts)

    @property
    def until(self):
        if not self.texts:
            return None
        return lambda _row, ids: self.final(ids[-self._window:])[1]

    def ids_before(self, ids: list[int], text: str) -> list[int]:
        """The most of `ids` whose text begins `text` (the text before a stop text: the token it begins in
        is not one of them)."""
        ids = self._end(ids)
        while ids and not text.startswith(self.decode(ids)):
            ids = ids[:-1]
        return ids

    def ids_through(self, ids: list[int]) -> list[int]:
        """The fewest of `ids` whose text holds a stop text (all of them, where none does): a longer prefix
        holds it too, so a binary search."""
        if not self.final(ids)[1]:
            return ids
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.final(ids[:mid])[1]:
                hi = mid
            else:
                lo = mid + 1
        return ids[:lo]

    def settled(self, ids: list[int]) -> str:
        """The text of `ids` (generated so far) that will not change: all of `final`'s once an end id or a
        stop text ended it, else without an ending that could begin a stop text, nor an unfinished
        character (so a stream never takes text back)."""
        text, found = self.final(ids)
        return text if found or len(self._end(ids)) < len(ids) else hold_back(text, self.texts)


def utf8_text(text: str, source: str) -> str:
    """`text`, or a `TwoTowerError` naming `source` where it was not UTF-8: Python reads such bytes in argv and
    stdin as lone surrogates, which the tokenizer refuses with a bare TypeError."""
    if (at := lone_surrogate_at(text)) is not None:
        raise TwoTowerError(f"{source} is not UTF-8 text (at character {at})", "convert it to UTF-8, e.g. with iconv -t UTF-8")
    return text


def json_text(text: str, source: str) -> str:
    """`text` read from JSON, or a `TwoTowerError` naming `source` where it holds a lone UTF-16 surrogate (an
    escape like "\\ud800", half of a pair): no text, and the tokenizer refuses it with a bare TypeError."""
    if (at := lone_surrogate_at(text)) is not None:
        raise TwoTowerError(f"{source} holds a lone UTF-16 surrogate escape (\\u{ord(text[at]):04x}, at character {at}), "
                            "which is no text", "escape the whole pair, or write the character itself")
    return text


def read_utf8(path: Path, what: str) -> str:
    """The text of the file `what` names (a prompt file), without the byte-order mark that Windows editors put
    first (else a JSONL file's first line reads as a plain prompt), or a `TwoTowerError` where it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TwoTowerError(f"{what} {path} is not UTF-8 text (at byte {e.start})",
                            "convert it to UTF-8, e.g. with iconv -t UTF-8") from None


def read_stdin(read) -> str:
    """`read()` of stdin (read or readline), or a `TwoTowerError` where it is not UTF-8 (a strict decoder
    raises; a surrogate-escaping one gives lone surrogates)."""
    try:
        return utf8_text(read(), "stdin")
    except UnicodeDecodeError as e:
        raise TwoTowerError(f"stdin is not UTF-8 text ({e.reason})", "convert it to UTF-8, e.g. with iconv -t UTF-8") from None


def _stdin_document() -> str:
    """All of stdin, without a leading byte-order mark, as `read_utf8` reads a file (a JSONL file piped in
    from a Windows editor read its first line as a plain prompt, mark and braces included)."""
    return read_stdin(sys.stdin.read).removeprefix("\ufeff")


def read_prompts(prompt: str | None, prompt_file: Path | None, conversations: bool = False) -> list:
    """Prompts from the argument, a file (one per line, or JSONL with `prompt`/`text`), or stdin: a PROMPT of
    `-` (as mlx-lm reads it), or none while stdin is not a terminal, is one prompt; a --prompt-file of `-` is
    the file. With `conversations` (generate --chat), a JSONL line may instead hold a whole conversation,
    `messages` ([{role, content}, ...]): it comes back as that list."""
    if prompt is not None and prompt_file is not None:
        raise TwoTowerError("both a PROMPT and --prompt-file were given", "use one of them")
    if prompt == "-" or (prompt is None and prompt_file is None and not sys.stdin.isatty()):
        prompts = [_stdin_document().rstrip("\n")]
    elif prompt is not None:
        prompts = [utf8_text(prompt, "the prompt")]
    elif str(prompt_file) == "-":
        prompts = parse_prompt_lines(_stdin_document().splitlines(), "stdin", conversations)
    elif prompt_file is not None:
        check_files([prompt_file], "prompt file", "check the path")  # a pipe too: `--prompt-file <(…)`
        prompts = parse_prompt_lines(read_utf8(prompt_file, "prompt file").splitlines(), str(prompt_file), conversations)
    else:
        raise TwoTowerError("no prompt given", 'pass one, e.g. twotower generate "ROMEO.", or use --prompt-file')
    if not prompts and prompt_file is not None:
        raise TwoTowerError(f"{'stdin' if str(prompt_file) == '-' else f'prompt file {prompt_file}'} holds no prompts", "one prompt per line, or JSONL with a prompt field")
    if not prompts or any(isinstance(p, str) and not p.strip() for p in prompts):
        raise TwoTowerError("empty prompt", "give some text to continue")
    return prompts


def parse_prompt_lines(lines: list[str], source: str, conversations: bool = False) -> list:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TwoTowerError(f"{source}:{n} is not valid JSON: {e.msg}", "one JSON object or one prompt per line") from None
        except RecursionError:
            raise TwoTowerError(f"{source}:{n} is not valid JSON: nested too deep",
                                "one JSON object or one prompt per line") from None
        if isinstance(obj, dict) and "messages" in obj:
            if not conversations:
                raise TwoTowerError(f"{source}:{n} is a conversation ('messages')", "generate it with --chat")
            messages = obj["messages"]
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                raise TwoTowerError(f"{source}:{n}: 'messages' must be a non-empty list of {{role, content}} strings",
                                    'e.g. {"messages": [{"role": "user", "content": "Hi"}]}')
            for m in messages:  # a JSON escape of half a surrogate pair ("\ud800") is no text: the tokenizer refuses it
                json_text(m["content"], f"{source}:{n}")
            out.append(messages)
            continue
        value = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            raise TwoTowerError(f"{source}:{n} has no string 'prompt' or 'text' field", "JSONL lines need one")
        if not value.strip():  # it said "empty prompt", not where
            raise TwoTowerError(f"{source}:{n} holds an empty prompt", "give each line some text to continue")
        out.append(json_text(value, f"{source}:{n}"))
    return out
