"""Model name → local folder, and nothing else.

`resolve(name_or_path)` accepts, in this order:
  1. an existing local folder or `.safetensors` file (returned as is);
  2. an embedded model name (`tiny`, `tiny-base`) → a folder inside the installed package;
  3. an alias from `ALIASES` (the one alias table of the project) or a hub repo id `owner/name`, either with
     an optional `@revision` (branch, tag or commit: `owner/name@v1.0`, `nemotron-3-nano@<commit>`)
     → the snapshot folder in the Hugging Face cache, downloaded through `huggingface_hub` when allowed.

Only the files a checkpoint needs are fetched (`DOWNLOAD_PATTERNS`). `HF_HOME`, `HF_HUB_CACHE`,
`HF_HUB_OFFLINE` and `HF_ENDPOINT` are read at call time (huggingface_hub reads them once at import, which tests and
long-lived processes would otherwise miss). Offline, only the local cache is used, and a model that is
not cached is a `TwoTowerError` with a hint, never a network attempt.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twotower_cli.errors import TwoTowerError

# The one alias table. Base-BF16 is the model NVIDIA's TwoTower was built from.
ALIASES: dict[str, str] = {
    "nemotron-3-nano": "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16",
    "nemotron-3-nano-base": "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16",
    "nemotron-3-nano-instruct": "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
    "nemotron-3-nano-bf16": "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
    "nemotron-labs-twotower": "nvidia/Nemotron-Labs-TwoTower-30B-A3B-Base-BF16",
}

# Models shipped inside the package (src/twotower_cli/assets/<folder>).
EMBEDDED: dict[str, str] = {"tiny": "tiny-twotower", "tiny-base": "tiny-base"}
# Where a command needs a single-tower source (split), `tiny` means the base that `tiny` was split from.
EMBEDDED_BASE: dict[str, str] = {"tiny": "tiny-base", "tiny-base": "tiny-base"}

ASSETS = Path(__file__).parent / "assets"

# Files besides the weights that travel with a checkpoint (split copies the same list).
AUX_FILE_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
)
DOWNLOAD_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", *AUX_FILE_PATTERNS)
TEXT_PATTERNS = ("config.json", *AUX_FILE_PATTERNS)  # what tokenizing needs: no weights

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_endpoint() -> str:
    """The hub's address as the environment says now (HF_ENDPOINT, a mirror; else huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now: the hub is not to be asked anything."""
    return _env_true("HF_HUB_OFFLINE")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now, as huggingface_hub reads it: HF_HUB_CACHE,
    else the legacy HUGGINGFACE_HUB_CACHE (still set by many images), else HF_HOME/hub."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def split_revision(name: str) -> tuple[str, str | None]:
    """`owner/name@rev` or `alias@rev` → (the name, the revision: a branch, tag or commit of the repository);
    `@` cannot be part of a repo name, so the first one starts the revision (which may hold `/`: `refs/pr/1`)."""
    base, sep, revision = name.partition("@")
    return (base, revision) if sep and base and revision else (name, None)


def repo_id_for(name: str) -> str | None:
    """The hub repo id a name stands for (alias or `owner/name`, an `@revision` after it kept), or None if it
    is neither."""
    base, revision = split_revision(name)
    repo = ALIASES.get(base.lower()) or (base if _REPO_ID.match(base) else None)
    return repo if repo is None or revision is None else f"{repo}@{revision}"


def _hf_download(repo: str) -> str:
    """The `hf download` command line for a repo id with an optional `@revision`."""
    repo_id, revision = split_revision(repo)
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")


def display_name(name_or_path: str) -> str:
    """A short name for a source, used for default output folders: `nemotron-3-nano`, `Foo-7B`, `my-ckpt`."""
    if name_or_path.lower() in EMBEDDED:
        return name_or_path.lower()
    if not Path(name_or_path).expanduser().exists():  # a hub name: its revision is no part of the name
        name_or_path = split_revision(name_or_path)[0]
    if name_or_path.lower() in ALIASES:
        return name_or_path.lower()
    p = Path(name_or_path).expanduser()  # as resolve() reads it
    if p.exists():
        # The folder, symlinks followed ("." has a name then), but not a file's own link: in a hub cache
        # snapshot each file links to blobs/<hash>, whose folder name says nothing.
        folder = (p if p.is_dir() else Path(os.path.abspath(p)).parent).resolve()
        repo = folder.parent.parent.name  # a snapshot: .../models--org--name/snapshots/<revision>
        if folder.parent.name == "snapshots" and repo.startswith("models--") and repo.count("--") >= 2:
            return repo.split("--", 2)[2]
        return folder.name
    return name_or_path.rstrip("/").split("/")[-1]


def resolve(name_or_path: str | Path, allow_download: bool = True, base: bool = False, weights: bool = True) -> Path:
    """A local folder or .safetensors file for a path, embedded name, alias or hub repo id.

    `base=True` asks for a single-tower source: the embedded name `tiny` then means `tiny-base`.
    `weights=False` fetches only config.json and the tokenizer files (`tokenize` needs no 63 GB of weights).
    Raises TwoTowerError when the name cannot be turned into local files.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
            return path
        raise TwoTowerError(f"{path} is neither a checkpoint folder nor a .safetensors file",
                            "pass a folder with config.json and safetensors weights")
    key = text.lower()
    if key in EMBEDDED:
        folder = ASSETS / (EMBEDDED_BASE if base else EMBEDDED)[key]
        if not (folder / "config.json").is_file():
            raise TwoTowerError(f"the embedded model {text!r} is not in this installation ({folder} is missing)",
                                "reinstall twotower-cli, or pass a checkpoint folder")
        return folder
    repo_id = repo_id_for(text)
    if repo_id is None and "@" in text and text.split("@", 1)[0].lower() in EMBEDDED:
        raise TwoTowerError(f"{text!r}: the embedded model {text.split('@', 1)[0]!r} has no revisions",
                            f"leave out the @…: -m {text.split('@', 1)[0]}")
    if repo_id is None:
        hint = "pass a checkpoint folder, a .safetensors file, a hub id like nvidia/Name, or one of: " + \
            ", ".join([*EMBEDDED, *ALIASES])
        if text.startswith((".", "/", "~")) or os.sep in text:
            raise TwoTowerError(f"{text} does not exist", hint)
        raise TwoTowerError(f"{text!r} is not a local path, a known model name or a hub repo id", hint)
    env_offline = hub_offline()
    offline = None if allow_download and not env_offline else "HF_HUB_OFFLINE" if env_offline else "command"
    return _snapshot(repo_id, offline, as_path=repo_id == text, patterns=DOWNLOAD_PATTERNS if weights else TEXT_PATTERNS)


def is_local(name_or_path: str) -> bool:
    """Whether `resolve` reads the name as a local path or an embedded model (before any hub name)."""
    return Path(name_or_path).expanduser().exists() or name_or_path.lower() in EMBEDDED


def hub_model(name_or_path: str) -> str | None:
    """The hub repo id a name means as `resolve` reads it (not a local path, not an embedded model), or None."""
    return None if is_local(name_or_path) else repo_id_for(name_or_path)


def local_or_hub(name_or_path: str, base: bool = False) -> tuple[Path | None, str | None]:
    """For what can be done from a hub model's headers before (or instead of) its download — inspect, split's
    plan, the load's checks (`runtime.fetch_model`): `(folder, None)`
    when the name is a local path, an embedded model or a hub model cached with its weights; `(None, repo_id)`
    for a hub model that is not, while the hub may be asked (HF_HUB_OFFLINE unset). Never downloads; raises
    the cache's TwoTowerError when the hub may not be asked, and resolve's for a name that is none of these."""
    repo_id = hub_model(name_or_path)
    try:
        return resolve(name_or_path, allow_download=False, base=base), None
    except TwoTowerError:
        if repo_id is None or hub_offline():
            raise
        return None, repo_id


def _snapshot(repo: str, offline: str | None, as_path: bool = False,
              patterns: tuple[str, ...] = DOWNLOAD_PATTERNS) -> Path:
    """The cached (or downloaded) snapshot of `repo` (a repo id, `@revision` after it or not). `offline`: None
    (downloads allowed), "HF_HUB_OFFLINE" or "command" (the command never downloads); the error names the one
    that applies. `as_path`: the name was typed as `owner/name`, which may also have been meant as a local
    folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    local = f" (and there is no folder {repo} here)" if as_path else ""
    repo_id, revision = split_revision(repo)
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline is not None,
                                   allow_patterns=list(patterns), endpoint=hub_endpoint())
    except LocalEntryNotFoundError:
        if offline is not None:
            if offline == "HF_HUB_OFFLINE":
                hint = "unset HF_HUB_OFFLINE to download it, or set HF_HOME to the cache that holds it"
            else:
                hint = (f"this command reads only the cache: download it first (`{_hf_download(repo)}`, or run "
                        "`twotower split` or `generate` on it), or set HF_HOME to the cache that holds it")
            raise TwoTowerError(f"{repo} is not in the Hugging Face cache at {cache} and downloads are off{local}",
                                hint) from None
        raise TwoTowerError(f"cannot download {repo}: the hub is not reachable{local}",
                            "check the network, or set HF_HOME to a cache that already holds it") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise repo_error(e, repo_id, revision, local) or TwoTowerError(
            f"cannot download {repo}: {e}", "check the network and your HF token") from None
    except HfHubHTTPError as e:
        raise TwoTowerError(f"cannot download {repo}: {e}", "check the network and your HF token") from None
    folder = Path(folder)
    if offline is not None and "*.safetensors" in patterns and not any(folder.glob("*.safetensors")):
        # The cache answers with whatever the snapshot holds: after `tokenize`, only the text files.
        hint = (f"download the weights first (`{_hf_download(repo)}`, or `twotower split` on it)"
                if offline == "command" else "unset HF_HUB_OFFLINE to download them")
        raise TwoTowerError(f"{repo} is in the Hugging Face cache at {cache} without its weights", hint)
    return folder


def repo_error(e: Exception, repo_id: str, revision: str | None = None, local: str = "") -> TwoTowerError | None:
    """The error line for huggingface_hub's answer that a repository, or the revision asked for, is not there
    or may not be read (`local`: what the not-found line adds); None for any other error."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        return TwoTowerError(f"{repo_id} is gated on the Hugging Face hub and this account may not read it",
                             "accept its terms on the model page, then `hf auth login`")
    if isinstance(e, RepositoryNotFoundError):
        return TwoTowerError(f"{repo_id} was not found on the Hugging Face hub{local}",
                             "check the spelling; private and gated models need `hf auth login`")
    if isinstance(e, RevisionNotFoundError) and revision is not None:
        return TwoTowerError(f"{repo_id} has no revision {revision!r} on the Hugging Face hub",
                             "name a branch, tag or commit of it after the @ (its page lists them)")
    return None


def aliases_help() -> str:
    """The alias table as help text (one `name → target` line each)."""
    width = max(len(k) for k in [*ALIASES, *EMBEDDED])
    lines = [f"{k.ljust(width)}  → {v}" for k, v in ALIASES.items()]
    lines += [f"{k.ljust(width)}  → embedded {EMBEDDED_BASE[k]} model" for k in EMBEDDED]
    return "\n".join(lines)
