"""A loopback stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub's `snapshot_download`.

It serves model folders from disk as repositories, as the Hub does: repo info per revision (with the commit sha),
the recursive file tree (git blob ids, LFS sha256 and sizes), `resolve` HEAD/GET with the headers the client
reads (ETag, X-Repo-Commit, Content-Length; X-Linked-Etag/X-Linked-Size on LFS redirects), a relative redirect
from a branch name to its commit, LFS files redirected to a CDN on another loopback host, 401 `GatedRepo` for a
gated repository without the token and 404 `RepoNotFound` for an unknown one. Every request is recorded, so
tests can assert which files were (never) asked for. Point `HF_ENDPOINT` at `HubEmulator.url`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".model")
"""Files the Hub stores in LFS (big binaries): their resolve answers with a redirect to the CDN."""


@dataclass
class HubRepo:
    """A model repository: the files under `folder`, at one commit."""

    repo_id: str
    folder: Path
    gated: bool = False
    commit: str = ""

    def __post_init__(self) -> None:
        self.commit = self.commit or hashlib.sha1(f"{self.repo_id}@{self.folder}".encode()).hexdigest()
        self.files = sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*") if p.is_file())
        self._git_oids: dict[str, str] = {}
        self._sha256s: dict[str, str] = {}

    def path_of(self, name: str) -> Path:
        return self.folder / name

    def git_oid(self, name: str) -> str:
        """The git blob id, what the Hub's tree lists as `oid` and sends as the ETag of a non-LFS file."""
        if name not in self._git_oids:
            data = self.path_of(name).read_bytes()
            self._git_oids[name] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return self._git_oids[name]

    def sha256(self, name: str) -> str:
        """The LFS object id, the ETag of an LFS file."""
        if name not in self._sha256s:
            self._sha256s[name] = hashlib.sha256(self.path_of(name).read_bytes()).hexdigest()
        return self._sha256s[name]

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)


@dataclass
class RecordedRequest:
    method: str
    path: str
    authorized: bool


@dataclass
class HubEmulator:
    """Start with `start()`, stop with `stop()`; `requests` lists every request in order."""

    repos: list[HubRepo]
    token: str = "hf_emulator_token"
    bytes_per_second: float | None = None
    """Throttle file bodies (to watch progress reports during a download); None: as fast as loopback goes."""
    requests: list[RecordedRequest] = field(default_factory=list)

    def start(self) -> HubEmulator:
        self._lock = threading.Lock()
        self._api = _server("127.0.0.1", self)
        self._cdn = _server("127.0.0.2", self)  # another host: the client stops there, as at the Hub's CDN
        return self

    def stop(self) -> None:
        for server in (self._api, self._cdn):
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._api.server_port}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.2:{self._cdn.server_port}"

    def repo(self, repo_id: str) -> HubRepo | None:
        return next((r for r in self.repos if r.repo_id == repo_id), None)

    def record(self, method: str, path: str, authorized: bool) -> None:
        with self._lock:
            self.requests.append(RecordedRequest(method, path, authorized))

    def files_requested(self, repo_id: str) -> set[str]:
        """Repository paths whose content or metadata was asked for (resolve HEAD/GET, CDN GET)."""
        repo = self.repo(repo_id)
        by_sha = {repo.sha256(name): name for name in repo.files if repo.is_lfs(name)} if repo else {}
        names = set()
        with self._lock:
            for request in self.requests:
                parts = urlparse(request.path).path.split("/")
                if parts[1:3] == repo_id.split("/") and len(parts) > 5 and parts[3] == "resolve":
                    names.add(unquote("/".join(parts[5:])))
                elif parts[1] == "cdn" and parts[2] in by_sha:
                    names.add(by_sha[parts[2]])
        return names


def _server(host: str, hub: HubEmulator) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), _handler_for(hub))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"hub-emulator-{host}", daemon=True).start()
    return server


def _handler_for(hub: HubEmulator) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_HubHandler,), {"hub": hub})


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        """No access log: the test's output stays readable."""

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    # ---- routing --------------------------------------------------------------------------------

    def _route(self, body: bool) -> None:
        authorized = self.headers.get("Authorization") == f"Bearer {self.hub.token}"
        self.hub.record(self.command, self.path, authorized)
        parts = [unquote(p) for p in urlparse(self.path).path.split("/")[1:]]
        if parts[:1] == ["cdn"] and len(parts) == 2:
            return self._cdn(parts[1], body)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self._known_repo("/".join(parts[2:4]))
            if repo is None:
                return None
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                return self._repo_info(repo, rest[1] if len(rest) > 1 else "main")
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo, rest[1])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._known_repo("/".join(parts[:2]))
            if repo is None:
                return None
            return self._resolve(repo, parts[3], "/".join(parts[4:]), authorized, body)
        return self._error(404, "EntryNotFound", f"no route {self.path}")

    def _known_repo(self, repo_id: str) -> HubRepo | None:
        repo = self.hub.repo(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit_of(self, repo: HubRepo, revision: str) -> str | None:
        if revision in ("main", repo.commit):
            return repo.commit
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    # ---- API --------------------------------------------------------------------------------------

    def _repo_info(self, repo: HubRepo, revision: str) -> None:
        if self._commit_of(repo, revision) is None:
            return
        self._json(
            {
                "_id": repo.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": repo.commit,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["transformers", "safetensors"],
                "library_name": "transformers",
                "siblings": [{"rfilename": name} for name in repo.files],
            }
        )

    def _tree(self, repo: HubRepo, revision: str) -> None:
        if self._commit_of(repo, revision) is None:
            return
        folders = sorted({str(Path(name).parent) for name in repo.files} - {"."})
        entries: list[dict] = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
        for name in repo.files:
            size = repo.path_of(name).stat().st_size
            entry = {"type": "file", "oid": repo.git_oid(name), "size": size, "path": name}
            if repo.is_lfs(name):
                entry["lfs"] = {"oid": repo.sha256(name), "size": size, "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    # ---- files ------------------------------------------------------------------------------------

    def _resolve(self, repo: HubRepo, revision: str, name: str, authorized: bool, body: bool) -> None:
        if repo.gated and not authorized:
            message = f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated."
            return self._error(401, "GatedRepo", message)
        commit = self._commit_of(repo, revision)
        if commit is None:
            return None
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist at {commit}")
        headers = {"X-Repo-Commit": commit}
        if revision != commit:  # a branch: the Hub answers with its commit's URL (same host, followed)
            location = f"/{repo.repo_id}/resolve/{commit}/{quote(name)}"
            return self._send(307, b"", {**headers, "Location": location}, body)
        if repo.is_lfs(name):
            sha256, size = repo.sha256(name), repo.path_of(name).stat().st_size
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(size), "ETag": f'"{sha256}"'})
            return self._send(302, b"", {**headers, "Location": f"{self.hub.cdn_url}/cdn/{sha256}"}, body)
        data = repo.path_of(name).read_bytes()
        return self._send(200, data, {**headers, "ETag": f'"{repo.git_oid(name)}"'}, body)

    def _cdn(self, sha256: str, body: bool) -> None:
        for repo in self.hub.repos:
            for name in repo.files:
                if repo.is_lfs(name) and repo.sha256(name) == sha256:
                    return self._send(200, repo.path_of(name).read_bytes(), {"ETag": f'"{sha256}"'}, body)
        return self._send(404, b"", {}, body)

    # ---- replies ----------------------------------------------------------------------------------

    def _json(self, payload: object) -> None:
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, self.command == "GET")

    def _error(self, status: int, code: str, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        self._send(status, payload, headers, self.command == "GET")

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body and data:
            self._write(data)

    def _write(self, data: bytes) -> None:
        rate = self.hub.bytes_per_second
        if rate is None:
            self.wfile.write(data)
            return
        chunk = max(1, int(rate / 20))
        for start in range(0, len(data), chunk):
            self.wfile.write(data[start : start + chunk])
            time.sleep(chunk / rate)


DECOYS = {
    "consolidated.safetensors": "the weights again, in Mistral's own layout (14.5 GB for Mistral-7B-Instruct-v0.3)",
    "pytorch_model.bin": "the weights as a pickle",
    "model.gguf": "llama.cpp's quantized weights",
    "original/params.json": "Meta's own config",
    "original/consolidated.00.pth": "Meta's own weights",
    "tokenizer.model": "the sentencepiece file, unneeded beside tokenizer.json",
    "README.md": "the model card",
}
"""Files a real repository holds beside what the server reads; a download must never ask for them."""


def hub_model_folder(source: Path, out_dir: Path, num_shards: int = 2) -> Path:
    """A Hub-style copy of a model folder: its safetensors split into `num_shards` shards with an index (as
    big models are), plus the decoys above. The engine must load it exactly as the source."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            (out_dir / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        shard_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[shard::num_shards]
        save_file({name: tensors[name] for name in part}, str(out_dir / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "consolidated.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    for name, what in DECOYS.items():
        if not (out_dir / name).exists():
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_text(f"decoy: {what}\n")
    return out_dir
