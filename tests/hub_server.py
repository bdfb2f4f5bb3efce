"""A small in-memory Hugging Face Hub for tests: the HTTP endpoints huggingface_hub and transformers use to push and
load models, served on 127.0.0.1 with the standard library only.

Model repos only; regular (non-LFS) uploads, so `hf_xet` and LFS are never involved; users and their tokens are given
at construction. Errors carry the `X-Error-Code` / `X-Error-Message` headers the real Hub sends, which is what turns
them into `RepositoryNotFoundError`, `EntryNotFoundError` or `RevisionNotFoundError` in the client.

    >>> with HubServer(tokens={"hf_alice": "alice"}) as hub:
    ...     env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_alice"}  # for a client process
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


REPO_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = self.branches.get(branch, "")
        digest = hashlib.sha1(f"{self.repo_id}\0{parent}\0{message}\0{len(self.commits)}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = files
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def card_metadata(self, sha: str) -> dict:
        readme = self.commits[sha].get("README.md", b"").decode("utf-8", "replace")
        match = re.match(r"^---\n(.*?)\n---", readme, flags=re.DOTALL)
        metadata = yaml.safe_load(match.group(1)) if match else None
        return metadata if isinstance(metadata, dict) else {}


class HubState:
    """Users (token -> user name) and repos, shared by the handler threads."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TestHub/1.0"

    # ---- plumbing -------------------------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def log_message(self, format, *args):  # keep the test output clean; requests are recorded instead
        pass

    def _read_body(self) -> bytes:
        """The whole request body, read before answering so that a kept-alive connection stays in sync."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _user(self, required: bool) -> str | None:
        """The user the bearer token belongs to; 401 for an unknown token, or for none when `required`."""
        authorization = self.headers.get("Authorization", "")
        token = authorization[len("Bearer ") :] if authorization.startswith("Bearer ") else None
        if token is None:
            if required:
                raise HubError(401, "You must be authenticated to access this resource.")
            return None
        if token not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.state.tokens[token]

    def _repo(self, namespace: str, name: str, user: str | None, write: bool = False) -> Repo:
        repo = self.state.repos.get(f"{namespace}/{name}")
        if repo is None or (repo.private and user != namespace):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and user != namespace:
            raise HubError(403, f"You don't have the rights to write to {namespace}/{name}")
        return repo

    def _dispatch(self):
        self.server.requests.append(f"{self.command} {self.path}")
        self.body = self._read_body()
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        try:
            with self.state.lock:
                self._route(parts)
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send_json(error.status, {"error": error.message}, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ---- routes ---------------------------------------------------------------------------------------------------
    def _route(self, parts: list[str]):
        method = self.command
        if parts[:1] == ["api"]:
            route = parts[1:]
            if method == "POST" and route == ["repos", "create"]:
                return self._create_repo()
            if method == "POST" and route == ["validate-yaml"]:
                return self._validate_yaml()
            if method == "GET" and route == ["whoami-v2"]:
                user = self._user(required=True)
                return self._send_json(200, {"type": "user", "name": user, "orgs": [], "auth": {}})
            if len(route) >= 3 and route[0] == "models":
                user = self._user(required=False)
                namespace, name, rest = route[1], route[2], route[3:]
                if method == "GET" and rest == []:
                    return self._model_info(self._repo(namespace, name, user), "main")
                if method == "GET" and len(rest) >= 2 and rest[0] == "revision":
                    return self._model_info(self._repo(namespace, name, user), "/".join(rest[1:]))
                if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    return self._tree(self._repo(namespace, name, user), rest[1], "/".join(rest[2:]))
                if method == "POST" and len(rest) >= 2 and rest[0] == "preupload":
                    return self._preupload(self._repo(namespace, name, self._user(required=True), write=True))
                if method == "POST" and len(rest) >= 2 and rest[0] == "commit":
                    repo = self._repo(namespace, name, self._user(required=True), write=True)
                    return self._commit(repo, "/".join(rest[1:]))
                if method == "POST" and len(rest) >= 2 and rest[0] == "branch":
                    repo = self._repo(namespace, name, self._user(required=True), write=True)
                    return self._create_branch(repo, "/".join(rest[1:]))
        elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self._repo(parts[0], parts[1], self._user(required=False))
            return self._resolve(repo, parts[3], "/".join(parts[4:]))
        raise HubError(404, f"Not found: {method} {self.path}")

    def _create_repo(self):
        user = self._user(required=True)
        payload = json.loads(self.body or b"{}")
        name, namespace = payload.get("name", ""), payload.get("organization") or user
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "This test Hub only hosts model repos")
        if not REPO_NAME.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name {name!r}: use letters, digits, '-', '_' and '.' (96 at most)")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.state.repos:
            return self._send_json(409, {"error": "You already created this model repo", "url": url})
        private = bool(payload.get("private")) or payload.get("visibility") == "private"  # huggingface_hub >= 1.x
        repo = self.state.repos[repo_id] = Repo(repo_id, private)
        repo.commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self):
        content = json.loads(self.body or b"{}").get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return self._send_json(400, {"errors": [{"message": f"Invalid YAML: {error}"}]})
        errors = []
        if not isinstance(metadata, dict | type(None)):
            errors.append({"message": "The metadata must be a mapping"})
        elif metadata:
            for key in ("tags", "datasets"):
                if key in metadata and not isinstance(metadata[key], list | str):
                    errors.append({"message": f"'{key}' must be a string or a list of strings"})
            if "base_model" in metadata and not isinstance(metadata["base_model"], list | str):
                errors.append({"message": "'base_model' must be a string or a list of strings"})
        self._send_json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _model_info(self, repo: Repo, revision: str):
        sha = repo.resolve(revision)
        metadata = repo.card_metadata(sha)
        files = repo.commits[sha]
        self._send_json(
            200,
            {
                "_id": repo.repo_id,
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": metadata.get("tags", []),
                "pipeline_tag": metadata.get("pipeline_tag"),
                "library_name": metadata.get("library_name"),
                "cardData": metadata or None,
                "siblings": [{"rfilename": path} for path in sorted(files)],
            },
        )

    def _tree(self, repo: Repo, revision: str, folder: str):
        files = repo.commits[repo.resolve(revision)]
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                folders.update(prefix + "/".join(rest.split("/")[:i]) for i in range(1, rest.count("/") + 1))
            entries.append({"type": "file", "path": path, "size": len(files[path]), "oid": _git_blob_sha(files[path])})
        if prefix and not entries and not folders:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        entries += [{"type": "directory", "path": path, "size": 0, "oid": "0" * 40} for path in sorted(folders)]
        self._send_json(200, entries)

    def _preupload(self, repo: Repo):
        payload = json.loads(self.body or b"{}")
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload.get("files", [])]
        self._send_json(200, {"files": files, "commitOid": repo.branches.get("main")})

    def _commit(self, repo: Repo, revision: str):
        if "create_pr" in self.query:
            raise HubError(400, "Pull requests are not supported by this test Hub")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[revision]])
        summary = "commit"
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary") or summary
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: content for path, content in files.items() if not path.startswith(folder)}
            else:
                raise HubError(422, f"Operation {key!r} is not supported by this test Hub (regular uploads only)")
        sha = repo.commit(revision, files, summary)
        url = f"{self.server.url}/{repo.repo_id}/commit/{sha}"
        self._send_json(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})

    def _create_branch(self, repo: Repo, branch: str):
        if branch in repo.branches:
            return self._send_json(409, {"error": f"Reference already exists: refs/heads/{branch}"})
        payload = json.loads(self.body or b"{}")
        repo.branches[branch] = repo.resolve(payload.get("startingPoint") or "main")
        self._send_json(200, {})

    def _resolve(self, repo: Repo, revision: str, path: str):
        sha = repo.resolve(revision)
        files = repo.commits[sha]
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_sha(content)}"', "Accept-Ranges": "none"}
        self._send(200, content, headers, content_type="application/octet-stream")


class HubServer:
    """The test Hub on 127.0.0.1 (a free port), served by a background thread; use as a context manager."""

    def __init__(self, tokens: dict[str, str]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
        self.httpd.daemon_threads = True
        self.httpd.state = HubState(tokens)
        self.httpd.requests = []
        self.url = self.httpd.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="test-hub", daemon=True)

    @property
    def repos(self) -> dict[str, Repo]:
        return self.httpd.state.repos

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()
