"""A local stand-in for the Hugging Face hub: the two routes huggingface_hub calls for a repository's file list
(`/api/models/<id>?blobs=true`) and its files (`/<id>/resolve/<revision>/<file>`, with byte ranges), serving
checkpoint folders from disk (conftest.py has the fixtures that point the environment at it;
benchmarks/inspect.py serves the 30B-shaped checkpoint with it)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from twotower_cli.remote import FIRST_READ

SHA = "5e1f" * 10


def sha_of(key: str) -> str:
    """The commit the fake hub names for a repository (`SHA`) or one of its revisions (`org/name@rev`)."""
    return SHA if "@" not in key else hashlib.sha1(key.encode()).hexdigest()


class FakeHub:
    """repo id (or `repo id@revision`) → folder; records every (file, first byte, last byte) it serves."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.reads: list[tuple[str, int, int]] = []
        self.api_calls: list[str] = []
        self.ignore_ranges = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                path = unquote(self.path.split("?")[0])
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                    hub.api_calls.append(self.path)
                    if m.group(1) not in {key.split("@")[0] for key in hub.repos}:
                        return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                    key = m.group(1) + (f"@{m.group(2)}" if m.group(2) not in (None, "main", SHA) else "")
                    folder = hub.repos.get(key)
                    if folder is None:
                        return self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
                    siblings = [{"rfilename": p.relative_to(folder).as_posix(), "size": p.stat().st_size}
                                for p in sorted(folder.rglob("*")) if p.is_file()]
                    body = json.dumps({"id": m.group(1), "sha": sha_of(key), "siblings": siblings}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"})
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                key = next((k for k in hub.repos if m and k.split("@")[0] == m.group(1) and sha_of(k) == m.group(2)),
                           None)
                if key is None:
                    return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"})
                file = hub.repos[key] / m.group(3)
                size = file.stat().st_size
                if self.headers["Range"] is None or hub.ignore_ranges:
                    return self._send_file(file, size)
                first, last = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers["Range"]).groups())
                last = min(last, size - 1)
                hub.reads.append((m.group(3), first, last))
                with open(file, "rb") as f:
                    f.seek(first)
                    body = f.read(last + 1 - first)
                self._send(206, body, {"Content-Range": f"bytes {first}-{last}/{size}"})

            def _send_file(self, file: Path, size: int) -> None:
                """200 with the whole file, as a server that ignores ranges does, until the client hangs up."""
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                sent = 0
                with open(file, "rb") as f:
                    try:
                        while chunk := f.read(1 << 16):
                            self.wfile.write(chunk)
                            sent += len(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                hub.reads.append((file.name, 0, sent - 1))

            def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def data_read(self, folder: Path) -> list[tuple[str, int, int]]:
        """Reads of a shard past its header: tensor data."""
        out = []
        for file, first, last in self.reads:
            if file.endswith(".safetensors"):
                header_end = 8 + int.from_bytes((folder / file).read_bytes()[:8], "little")
                if last >= max(header_end, FIRST_READ):
                    out.append((file, first, last))
        return out
