"""The headers of a hub repository, read over the network, for what can be done before (or instead of) its
download: `twotower inspect` on a model not in the cache, split's plan, the load's checks (`runtime.fetch_model`).

`fetch_headers(repo, into)` fills the folder `into` with what `inspect_checkpoint` reads, all at one
revision (the commit the hub names when asked for the file list — of `main`, or of the `@revision` after the
name — so that a push in between cannot mix two versions): config.json, the safetensors index and the small text files beside them whole, and of each
safetensors shard only its header — one range request for its first 100 kB, a second one when the header is
longer. A 60 GB repository costs a few MB. The shards' true sizes come back in `Remote.file_sizes`, which
`inspect_checkpoint(into, file_sizes=...)` checks the headers against (a shard cut short on the hub reads as
truncated). The tokenizer (tokenizer.json, tokenizer.model: MBs) is an empty file in `into`: inspect only asks
whether it is there, and split's plan only lists it. `header_folder` does this in a temporary folder.

huggingface_hub does the talking: `HfApi.model_info(files_metadata=True)` lists the files with their sizes,
`hf_hub_url` and its shared HTTP session (token, endpoint, redirects to the CDN) read them, and its errors say
what went wrong. The cache is neither read nor written.
"""

from __future__ import annotations

import json
import struct
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twotower_cli.checkpoint import INDEX_NAME, MAX_HEADER_BYTES
from twotower_cli.errors import TwoTowerError
from twotower_cli.hub import AUX_FILE_PATTERNS, hub_endpoint, repo_error, split_revision

# The tokenizer itself (MBs): inspect asks only whether it is there, split's plan lists it among the files it copies.
PRESENT_ONLY = ("tokenizer.json", "tokenizer.model")
# Read whole: what inspect and split's plan parse besides the headers.
WHOLE_FILES = ("config.json", INDEX_NAME, "training.json", *(p for p in AUX_FILE_PATTERNS if p not in PRESENT_ONLY))
WHOLE_LIMIT = 64 * 1024 * 1024
FIRST_READ = 100_000  # most safetensors headers fit (huggingface_hub reads the same first)
TIMEOUT_S = 30.0
NOT_DOWNLOADED = " (checked from its headers: nothing was downloaded)"  # what a check before a download adds
PARALLEL = 8


@dataclass
class Remote:
    """What `fetch_headers` read: the repository, the revision it pinned, the size of every shard on the hub,
    and what it cost."""

    repo_id: str
    revision: str
    file_sizes: dict[str, int]
    requests: int = 0
    bytes_read: int = 0


def fetch_headers(repo: str, into: Path, endpoint: str | None = None, as_path: bool = False) -> Remote:
    """Fill `into` with the headers and small files of `repo` (a repo id, `@revision` after it or not) on the
    hub (see the module docstring). Raises TwoTowerError for a repository or revision that is not there, not
    readable, or not safetensors. `as_path`: the name was typed as `owner/name`, which may also have been meant
    as a local folder (the error says so)."""
    from huggingface_hub import HfApi

    repo_id, asked = split_revision(repo)
    endpoint = endpoint or hub_endpoint()  # as the environment says now: huggingface_hub reads it at import
    api = HfApi(endpoint=endpoint)
    local = f" (and there is no folder {repo} here)" if as_path else ""
    info = _ask(repo_id, lambda: api.model_info(repo_id, revision=asked, files_metadata=True, timeout=TIMEOUT_S),
                local=local, asked=asked)
    revision = info.sha or asked or "main"
    sizes = {s.rfilename: s.size for s in info.siblings or [] if "/" not in s.rfilename}
    shards = sorted(n for n in sizes if n.endswith(".safetensors"))
    if not shards:
        raise TwoTowerError(f"{repo_id} on the Hugging Face hub holds no safetensors weights",
                            "twotower reads safetensors checkpoints; check the repository's files on the hub")
    if unknown := [n for n in shards if sizes[n] is None]:
        raise TwoTowerError(f"the hub did not say the size of {unknown[0]} in {repo_id}",
                            f"try again, or download it (`hf download {repo_id}`) and use the folder")
    remote = Remote(repo_id, revision, {n: sizes[n] for n in shards})
    reader = _Reader(repo_id, revision, endpoint)
    for name in WHOLE_FILES:
        if name in sizes:
            if sizes[name] is None or sizes[name] > WHOLE_LIMIT:
                raise TwoTowerError(f"{name} in {repo_id} is of unknown size or over {WHOLE_LIMIT:,} bytes",
                                    f"download it (`hf download {repo_id}`) and use the folder")
            (into / name).write_bytes(reader.read(name, 0) if sizes[name] else b"")
    for name in PRESENT_ONLY:
        if name in sizes:
            (into / name).touch()
    with ThreadPoolExecutor(min(PARALLEL, len(shards))) as pool:
        for name, header in zip(shards, pool.map(lambda n: reader.header(n, sizes[n]), shards), strict=True):
            (into / name).write_bytes(header)
    remote.requests, remote.bytes_read = reader.requests, reader.bytes_read
    return remote


@contextmanager
def header_folder(repo: str, endpoint: str | None = None, as_path: bool = False,
                  note: str = "") -> Iterator[tuple[Path, Remote]]:
    """`fetch_headers` into a temporary folder, removed on leaving the block. A TwoTowerError raised in the
    block names `repo` where it named that folder, and gets `note` after its message."""
    with tempfile.TemporaryDirectory(prefix="twotower-headers-") as tmp:
        got = fetch_headers(repo, Path(tmp), endpoint=endpoint, as_path=as_path)
        try:
            yield Path(tmp), got
        except TwoTowerError as e:
            raise TwoTowerError(e.message.replace(tmp, repo) + note, e.hint and e.hint.replace(tmp, repo)) from None


class _Reader:
    """Byte ranges of one repository's files at one revision, through huggingface_hub's HTTP session."""

    def __init__(self, repo_id: str, revision: str, endpoint: str | None):
        self.repo_id, self.revision, self.endpoint = repo_id, revision, endpoint
        self.requests = self.bytes_read = 0
        self._lock = threading.Lock()  # shards are read from several threads

    def read(self, name: str, start: int, length: int | None = None) -> bytes:
        """At most `length` bytes of `name` from `start` (fewer where the file ends first); `length=None`: the
        whole file, asked for without a range."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, name, revision=self.revision, endpoint=self.endpoint)
        headers = build_hf_headers()
        if length is not None:
            headers["range"] = f"bytes={start}-{start + length - 1}"

        def get() -> bytes:
            with get_session().stream("GET", url, headers=headers, timeout=TIMEOUT_S) as response:
                if response.status_code >= 400:
                    response.read()  # the error's body, for huggingface_hub's message
                hf_raise_for_status(response)
                if length is None or response.status_code == 206:
                    return response.read()
                # A server that ignores the range (a plain mirror) answers with the whole file: take the part
                # asked for and hang up, rather than fetch gigabytes of weights.
                got = bytearray()
                for chunk in response.iter_bytes():
                    got += chunk
                    if len(got) >= start + length:
                        break
                return bytes(got[start:start + length])

        data = _ask(self.repo_id, get, name)
        with self._lock:
            self.requests += 1
            self.bytes_read += len(data)
        return data

    def header(self, name: str, size: int) -> bytes:
        """The first bytes of a safetensors file, through the end of its header (or all the file holds, or the
        8 length bytes alone when the length is absurd: the header parser says what is wrong)."""
        head = self.read(name, 0, min(FIRST_READ, size)) if size else b""
        if len(head) < 8:
            return head
        (n,) = struct.unpack("<Q", head[:8])
        want = min(8 + n, size)
        if n > MAX_HEADER_BYTES:
            return head[:8]
        if len(head) < want:
            head += self.read(name, len(head), want - len(head))
        return head[:want]


def _ask(repo_id: str, call: Any, name: str | None = None, local: str = "", asked: str | None = None) -> Any:
    """`call()`, with huggingface_hub's errors (and the network's) said as TwoTowerErrors (`local`: what the
    not-found error adds; `asked`: the revision the user named, for the model info call)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import httpx  # httpx (huggingface_hub 1.x) or httpx2 (2.x), whichever it uses

    what = f"{name} in {repo_id}" if name else repo_id
    try:
        return call()
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError) as e:
        # a revision or file the listing named, gone by the time it is read: a push in between
        raise repo_error(e, repo_id, asked, local) or TwoTowerError(
            f"{what} changed on the hub while it was read", "run the command again") from None
    except HfHubHTTPError as e:
        raise TwoTowerError(f"cannot read {what} from the Hugging Face hub: {str(e).splitlines()[0]}",
                            "check the network and your HF token") from None
    except (OSError, json.JSONDecodeError) as e:
        raise TwoTowerError(f"cannot read {what} from the Hugging Face hub: {e}", "check the network") from None
    except httpx.HTTPError as e:  # the transport's own: connection refused, timeouts, TLS
        raise TwoTowerError(f"cannot reach the Hugging Face hub for {what}: {e}",
                            "check the network (HF_ENDPOINT, proxies); a model in the cache is read without it") from None
