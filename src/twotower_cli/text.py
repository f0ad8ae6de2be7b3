"""Tokenizer loading and prompt reading: the boundary between text and ids for the commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from twotower_cli.errors import TwoTowerError


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

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    """Prompts from the argument, a file (one per line, or JSONL with `prompt`/`text`), or stdin."""
    if prompt is not None and prompt_file is not None:
        raise TwoTowerError("both a PROMPT and --prompt-file were given", "use one of them")
    if prompt is not None:
        prompts = [prompt]
    elif prompt_file is not None:
        if not prompt_file.is_file():
            raise TwoTowerError(f"prompt file {prompt_file} does not exist", "check the path")
        prompts = parse_prompt_lines(prompt_file.read_text().splitlines(), str(prompt_file))
    elif not sys.stdin.isatty():
        prompts = [sys.stdin.read().rstrip("\n")]
    else:
        raise TwoTowerError("no prompt given", 'pass one, e.g. twotower generate "ROMEO.", or use --prompt-file')
    if not prompts or any(not p.strip() for p in prompts):
        raise TwoTowerError("empty prompt", "give some text to continue")
    return prompts


def parse_prompt_lines(lines: list[str], source: str) -> list[str]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TwoTowerError(f"{source}:{n} is not valid JSON: {e.msg}", "one JSON object or one prompt per line") from None
            value = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise TwoTowerError(f"{source}:{n} has no string 'prompt' or 'text' field", "JSONL lines need one")
            out.append(value)
        else:
            out.append(line)
    return out
