"""A loopback stand-in for the Hub endpoints that huggingface_hub's whoami / create_repo / upload_folder call.

    with LocalHub(token="hf_test") as hub:      # http://127.0.0.1:<random port>, stopped when the block ends
        ... run `qlora-kit push` with HF_ENDPOINT=hub.endpoint, HF_TOKEN=hub.token ...
        hub.repos["alice/shout"].files          # {path in repo: bytes received}

Endpoints, as read from huggingface_hub 1.x (hf_api.py, _commit_api.py, _upload_pipeline.py):
  GET  /api/whoami-v2                                   who the token belongs to
  POST /api/repos/create                                {"name", "organization", "visibility"?, "type"?}
  POST /api/validate-yaml                               README.md front matter check
  POST /api/models/{repo_id}/preupload/{revision}       per file: "regular" or "lfs" upload mode
  POST /api/models/{repo_id}/commit/{revision}          NDJSON: a header line, then one line per file
Every file is answered "regular", so its bytes arrive base64-encoded inside the commit and nothing goes through LFS or
Xet storage (whether hf_xet is installed or not).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # commit summaries


class LocalHub:
    def __init__(self, token: str, user: str = "alice", orgs: tuple[str, ...] = ("acme",),
                 writable_orgs: tuple[str, ...] = (), timeout: float = 60.0) -> None:
        self.token, self.user, self.orgs, self.writable_orgs = token, user, orgs, writable_orgs
        self.timeout = timeout
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD /path" of every request, in order
        self.unexpected: list[str] = []
        self.authorization: set[str] = set()

    # ------------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # httpx keeps connections alive
            timeout = 10  # seconds a silent client may hold a connection

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                hub.handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                hub.handle(self, "POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        # Bounded even if a test hangs: the server shuts itself down after `timeout` seconds.
        self.deadline = threading.Timer(self.timeout, self.server.shutdown)
        self.deadline.daemon = True
        self.deadline.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deadline.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # -------------------------------------------------------------------------------------------- handling

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = request.path.split("?")[0]
        self.requests.append(f"{method} {path}")
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        if path == "/api/agent-harnesses":  # huggingface_hub's optional user-agent registry; errors are ignored
            return self.reply(request, 404, {"error": "not served here"})
        auth = request.headers.get("Authorization", "")
        self.authorization.add(auth)
        if auth != f"Bearer {self.token}":
            return self.reply(request, 401, {"error": "Invalid credentials in Authorization header"})
        repo_path = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if method == "GET" and path == "/api/whoami-v2":
            return self.reply(request, 200, {
                "type": "user", "name": self.user, "orgs": [{"name": org} for org in self.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(request, json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self.reply(request, 200, {"errors": [], "warnings": []})
        if method == "POST" and repo_path:
            repo_id, action = repo_path.group(1), repo_path.group(2)
            if repo_id not in self.repos:
                return self.reply(request, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self.reply(request, 200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
            return self.commit(request, repo_id, body)
        self.unexpected.append(f"{method} {path}")
        return self.reply(request, 404, {"error": f"not implemented by LocalHub: {method} {path}"})

    def create_repo(self, request: BaseHTTPRequestHandler, payload: dict) -> None:
        namespace = payload.get("organization") or self.user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != self.user and namespace not in self.writable_orgs:
            return self.reply(request, 403, {"error": f'You don\'t have the rights to create a model under the '
                                                      f'namespace "{namespace}"'})
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return self.reply(request, 409, {"error": "You already created this model repo", "url": url})
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return self.reply(request, 200, {"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()})

    def commit(self, request: BaseHTTPRequestHandler, repo_id: str, body: bytes) -> None:
        repo = self.repos[repo_id]
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                repo.commits.append(item["value"]["summary"])
            elif item["key"] == "file":
                repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                self.unexpected.append(f"commit line {item['key']}")
        oid = hashlib.sha1(body).hexdigest()
        return self.reply(request, 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                                         "success": True})

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, payload: dict,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        request.wfile.write(data)
