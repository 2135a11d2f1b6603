r"""A minimal Hugging Face Hub-compatible HTTP server for the tests (standard library only).

It implements just the endpoints that ``huggingface_hub`` calls to create a repository, push a
folder in one commit, and download files, keeping every commit in memory:

======  ================================================  =========================================
method  path                                              used by
======  ================================================  =========================================
POST    ``/api/repos/create``                             ``create_repo`` (409 when it exists)
POST    ``/api/validate-yaml``                            ``upload_folder``: README.md front matter
POST    ``/api/models/{repo}/preupload/{revision}``       ``create_commit``: every file "regular"
POST    ``/api/models/{repo}/commit/{revision}``          ``create_commit``: NDJSON, base64 files
GET     ``/api/models/{repo}[/revision/{revision}]``      ``model_info`` / ``repo_exists``
HEAD    ``/{repo}/resolve/{revision}/{path}``             ``hf_hub_download`` (metadata)
GET     ``/{repo}/resolve/{revision}/{path}``             ``hf_hub_download`` (content)
======  ================================================  =========================================

A revision is a branch name or a commit sha. Errors carry the ``X-Error-Code`` header
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that the client turns into
its typed exceptions. A private repository answers only requests with the token it was created
with (``Authorization: Bearer ...``). ``corrupt(repo, path)`` damages a stored file in place, to
test the client's failure handling.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubState:
    r"""Repositories: ``{repo_id: {"private", "token", "branches", "commits"}}``."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []

    def resolve(self, repo: dict, revision: str) -> dict | None:
        sha = repo["branches"].get(revision, revision)
        return repo["commits"].get(sha)


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # -- helpers -----------------------------------------------------------------------------

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head=False):
        self.send_response(code)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, code: int, obj, headers: dict | None = None, head=False):
        self._send(code, json.dumps(obj).encode(), headers, head)

    def _error(self, code: int, error_code: str, message: str, head=False):
        self._json(code, {"error": message}, {"X-Error-Code": error_code}, head)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _repo(self, repo_id: str, head=False) -> dict | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            return None
        if repo["private"] and self._token() != repo["token"]:  # as the Hub: 401, not 403
            self._error(401, "RepoNotFound", f"Repository {repo_id} not found", head)
            return None
        return repo

    # -- routes --------------------------------------------------------------------------------

    def do_POST(self):  # noqa: N802
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(("POST", path))
        body = self._body()
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = (
                f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            )
            url = f"http://{self.headers['Host']}/{repo_id}"
            with self.state.lock:
                if repo_id in self.state.repos:
                    return self._json(409, {"error": "repo exists", "url": url})
                self.state.repos[repo_id] = {
                    # older clients send "private", newer ones "visibility"
                    "private": bool(req.get("private")) or req.get("visibility") == "private",
                    "token": self._token(),
                    "branches": {"main": "0" * 40},
                    "commits": {"0" * 40: {}},
                }
            return self._json(200, {"url": url, "name": repo_id})
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            if not content.startswith("---\n") or "\n---" not in content[3:]:
                return self._json(200, {"errors": [], "warnings": [{"message": "no metadata"}]})
            return self._json(200, {"errors": [], "warnings": []})
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :]
            for action in ("preupload", "commit"):
                marker = f"/{action}/"
                if marker in rest:
                    repo_id, revision = rest.split(marker, 1)
                    repo = self._repo(repo_id)
                    if repo is None:
                        return None
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        modes = [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in files
                        ]
                        return self._json(200, {"files": modes, "commitOid": None})
                    return self._commit(repo_id, repo, revision, body)
        return self._error(404, "EntryNotFound", f"no route POST {path}")

    def _commit(self, repo_id: str, repo: dict, revision: str, body: bytes):
        with self.state.lock:
            parent = repo["branches"].get(revision)
            if parent is None:
                return self._error(404, "RevisionNotFound", f"branch {revision} not found")
            files = dict(repo["commits"][parent])
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] == "lfsFile":
                    return self._error(400, "BadRequest", "this test server takes no LFS files")
            sha = hashlib.sha1(parent.encode() + body).hexdigest()
            repo["commits"][sha] = files
            repo["branches"][revision] = sha
        url = f"http://{self.headers['Host']}/{repo_id}/commit/{sha}"
        return self._json(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})

    def do_GET(self):  # noqa: N802
        self._get(head=False)

    def do_HEAD(self):  # noqa: N802
        self._get(head=True)

    def _get(self, head: bool):
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(("HEAD" if head else "GET", path))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :]
            repo_id, _, revision = rest.partition("/revision/")
            repo = self._repo(repo_id, head)
            if repo is None:
                return None
            revision = revision or "main"
            files = self.state.resolve(repo, revision)
            if files is None:
                return self._error(404, "RevisionNotFound", f"revision {revision}", head)
            sha = repo["branches"].get(revision, revision)
            info = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": repo["private"],
                "siblings": [{"rfilename": name} for name in sorted(files)],
            }
            return self._json(200, info, head=head)
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            revision, _, filename = rest.partition("/")
            repo = self._repo(repo_id, head)
            if repo is None:
                return None
            files = self.state.resolve(repo, revision)
            if files is None:
                return self._error(404, "RevisionNotFound", f"revision {revision}", head)
            if filename not in files:
                return self._error(404, "EntryNotFound", f"{filename} not in {repo_id}", head)
            data = files[filename]
            sha = repo["branches"].get(revision, revision)
            headers = {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": sha,
                "ETag": '"' + hashlib.sha1(data).hexdigest() + '"',
            }
            return self._send(200, data, headers, head)
        return self._error(404, "EntryNotFound", f"no route GET {path}", head)


class HubServer:
    r"""Runs the server on 127.0.0.1 on a free port in a daemon thread.

    Example:
        >>> with HubServer() as hub:            # doctest: +SKIP
        ...     os.environ["HF_ENDPOINT"] = hub.url
    """

    def __init__(self):
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def corrupt(self, repo_id: str, path: str, keep: int | None = None) -> None:
        r"""Damages ``path`` at the head of ``main``: truncates it to ``keep`` bytes, or flips
        bytes in its middle when ``keep`` is ``None``. The commit sha is unchanged."""

        repo = self.state.repos[repo_id]
        files = repo["commits"][repo["branches"]["main"]]
        data = bytearray(files[path])
        if keep is not None:
            data = data[:keep]
        else:
            mid = len(data) // 2
            data[mid : mid + 16] = bytes(255 - b for b in data[mid : mid + 16])
        files[path] = bytes(data)
