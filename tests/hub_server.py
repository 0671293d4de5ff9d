"""A Hugging Face Hub stand-in on loopback, for tests: huggingface_hub's own code
talks to it over HTTP (HF_ENDPOINT pointed at it), so what is exercised is the
real client path (model_info, the tree listing, snapshot_download, the safetensors
metadata API's range requests, hf_hub_download into a real cache), offline.

It serves what those calls read: ``/api/models/{repo}[/revision/{rev}]``,
``/api/models/{repo}/tree/{rev}``, and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``
with ``Range``, the hub's headers (X-Repo-Commit, ETag, X-Error-Code on 404).
Every request is recorded (method, path, range) so tests can tell header reads
from weight downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    """Repos by id: each a list of commits (path -> bytes) and branches -> commit."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}
        self.refs: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.on_request = None  # called with (method, path, Range) before each answer
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def push(self, repo: str, folder: str, branch: str = "main") -> str:
        """Commit every file of `folder` to `repo` on `branch`; the new commit's sha."""
        files = {}
        for dirpath, _, names in os.walk(folder):
            for n in names:
                p = os.path.join(dirpath, n)
                with open(p, "rb") as f:
                    files[os.path.relpath(p, folder)] = f.read()
        n = len(self.commits.get(repo, {}))
        sha = hashlib.sha1(f"{repo}:{n}:{sorted(files)}".encode()).hexdigest()
        self.commits.setdefault(repo, {})[sha] = files
        self.refs.setdefault(repo, {})[branch] = sha
        return sha

    # --------------------------------------------------------------- serving

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def weight_downloads(self) -> list[str]:
        """Paths of GETs of safetensors files that were not header range reads."""
        out = []
        for method, path, rng in self.requests:
            if method == "GET" and path.endswith(".safetensors") and "/resolve/" in path:
                m = re.match(r"bytes=(\d+)-(\d*)", rng or "")
                if m is None or int(m.group(1)) not in (0, 8):
                    out.append(path)
        return out

    def _resolve(self, repo: str, rev: str) -> str | None:
        if rev in self.commits.get(repo, {}):
            return rev
        return self.refs.get(repo, {}).get(rev)

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        if self.on_request is not None:
            self.on_request("HEAD" if head else "GET", path, h.headers.get("Range"))
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?$", path)
        if m:
            repo, kind, rev = m.group(1), m.group(2), m.group(3) or "main"
            if repo not in self.commits:
                return self._send(h, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
            sha = self._resolve(repo, rev)
            if sha is None:
                return self._send(h, 404, b"{}", {"X-Error-Code": "RevisionNotFound"}, head)
            files = self.commits[repo][sha]
            if kind == "tree":
                doc = [
                    {
                        "type": "file",
                        "path": p,
                        "size": len(b),
                        "oid": hashlib.sha1(b).hexdigest(),
                        **(
                            {
                                "lfs": {
                                    "oid": hashlib.sha256(b).hexdigest(),
                                    "size": len(b),
                                    "pointerSize": 134,
                                }
                            }
                            if p.endswith(".safetensors")
                            else {}
                        ),
                    }
                    for p, b in sorted(files.items())
                ]
            else:
                doc = {
                    "id": repo,
                    "modelId": repo,
                    "sha": sha,
                    "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                }
            return self._send(h, 200, json.dumps(doc).encode(), {}, head)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m is None:
            return self._send(h, 404, b"not found", {}, head)
        repo, rev, name = m.groups()
        if repo not in self.commits:
            return self._send(h, 404, b"", {"X-Error-Code": "RepoNotFound"}, head)
        sha = self._resolve(repo, rev)
        if sha is None:
            return self._send(h, 404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
        data = self.commits[repo][sha].get(name)
        if data is None:
            return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, head)
        etag = (
            hashlib.sha256(data).hexdigest()
            if name.endswith(".safetensors")
            else hashlib.sha1(data).hexdigest()
        )
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        rng = re.match(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if rng and not head:
            a = int(rng.group(1))
            b = min(int(rng.group(2)) if rng.group(2) else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
            return self._send(h, 206, data[a : b + 1], headers, head)
        return self._send(h, 200, data, headers, head)

    @staticmethod
    def _send(h, code: int, body: bytes, headers: dict, head: bool) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
