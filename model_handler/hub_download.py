"""Fetch a Hub model for `HF_MODEL_ID`: list the repository, choose the files the engine reads, download those.

huggingface_hub does the transfers into its cache (so a restart with HF_HUB_OFFLINE=1 finds them); this module
decides what they are (`hub_files.select_files`, from the file list and the checkpoint index, before any
weight is fetched), reports bytes done of total while they arrive, and turns the Hub's failures (unknown
repository, gated without a token, no network) into one start-up error naming the repository.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from model_handler import envs
from model_handler.hub_files import LayoutError, select_files
from model_handler.startup_progress import ByteProgress, format_bytes

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.25


@dataclass(slots=True, frozen=True)
class HubOptions:
    """The Hub variables of one start-up."""

    revision: str | None
    token: str | None
    cache_dir: str | None
    endpoint: str | None
    offline: bool
    progress_interval_s: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> HubOptions:
        return cls(
            revision=envs.get(environ, "HF_MODEL_REVISION"),
            token=envs.get(environ, "HF_TOKEN") or envs.get(environ, "HUGGING_FACE_HUB_TOKEN"),
            cache_dir=envs.get(environ, "HUGGINGFACE_HUB_CACHE") or envs.get(environ, "HF_HUB_CACHE"),
            endpoint=envs.get(environ, "HF_ENDPOINT"),
            offline=envs.get(environ, "HF_HUB_OFFLINE"),
            progress_interval_s=envs.get(environ, "STARTUP_PROGRESS_SECONDS"),
        )


def download_model(repo_id: str, options: HubOptions) -> Path:
    """The local snapshot folder of `repo_id` holding every file the engine reads; ValueError naming the
    repository (and what to change) when it cannot be had."""
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = options.endpoint or _default_endpoint()
    try:
        if options.offline:
            return _cached_snapshot(repo_id, options)
        return _download(repo_id, options)
    except GatedRepoError as exc:
        raise ValueError(
            f"HF_MODEL_ID={repo_id!r} is a gated repository on {where}: set HF_TOKEN to a token of an account that "
            f"was granted access to it ({_first_line(exc)})"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ValueError(
            f"HF_MODEL_ID={repo_id!r}: no such model repository on {where} (or it is private: set HF_TOKEN) "
            f"({_first_line(exc)})"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ValueError(
            f"HF_MODEL_REVISION={options.revision!r} does not exist in {repo_id!r} on {where} ({_first_line(exc)})"
        ) from exc
    except LayoutError as exc:
        raise ValueError(f"HF_MODEL_ID={repo_id!r}: {exc}") from exc
    except Exception as exc:  # network, server errors: all end start-up the same way
        how = "offline (HF_HUB_OFFLINE is set) and not in the local cache" if options.offline else f"{where} failed"
        raise ValueError(
            f"HF_MODEL_ID={repo_id!r} is not a local folder and could not be had from the Hub: {how}: "
            f"{type(exc).__name__}: {_first_line(exc)}. Mount the model under /opt/ml/model or set HF_MODEL_ID to a "
            "folder."
        ) from exc


def _download(repo_id: str, options: HubOptions) -> Path:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # ours report the whole snapshot (and log it); the Hub's would repeat it per file
    api = HfApi(endpoint=options.endpoint, token=options.token)
    commit = api.repo_info(repo_id, revision=options.revision).sha
    sizes = {
        entry.path: entry.size
        for entry in api.list_repo_tree(repo_id, recursive=True, revision=commit)
        if isinstance(entry, RepoFile)
    }

    def read_index(name: str) -> dict:
        path = hf_hub_download(
            repo_id, name, revision=commit, cache_dir=options.cache_dir, token=options.token, endpoint=options.endpoint
        )
        return json.loads(Path(path).read_text())

    files = select_files(sizes, read_index)
    total = sum(sizes[name] for name in files)
    skipped = sorted(set(sizes) - set(files))
    logger.info(
        "downloading %d files (%s) of %s at %s; %d files the engine does not read are skipped",
        len(files),
        format_bytes(total),
        repo_id,
        commit,
        len(skipped),
        extra={"repo_id": repo_id, "commit": commit, "files": files, "skipped": skipped, "bytes_total": total},
    )
    storage = _storage_folder(repo_id, options.cache_dir)
    with ByteProgress("download", f"downloading {repo_id}", total, options.progress_interval_s) as progress:
        poller = _CachePoller(storage, commit, {name: sizes[name] for name in files}, progress)
        poller.start()
        try:
            # The named revision (not the commit) so the cache records it and an offline restart resolves it.
            path = snapshot_download(
                repo_id,
                revision=options.revision,
                cache_dir=options.cache_dir,
                token=options.token,
                endpoint=options.endpoint,
                allow_patterns=[_literal(name) for name in files],
            )
        finally:
            poller.stop()
    return Path(path)


def _cached_snapshot(repo_id: str, options: HubOptions) -> Path:
    """HF_HUB_OFFLINE: the cached snapshot of the revision, checked to hold every file the engine reads."""
    from huggingface_hub import snapshot_download

    path = Path(
        snapshot_download(
            repo_id,
            revision=options.revision,
            cache_dir=options.cache_dir,
            local_files_only=True,
            allow_patterns=["config.json"],
        )
    )
    cached = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    needed = select_files(cached, lambda name: json.loads((path / name).read_text()))
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise LayoutError(f"the cached snapshot {path} lacks {', '.join(missing)} and HF_HUB_OFFLINE is set")
    logger.info("using the cached snapshot of %s (HF_HUB_OFFLINE)", repo_id, extra={"path": str(path)})
    return path


class _CachePoller:
    """Measures a snapshot download from the cache on disk: files already in the snapshot count whole, files
    in flight by their `.incomplete` blob. Independent of how huggingface_hub transfers (HTTP writes 10 MiB
    chunks, Xet ranges) and of its progress-bar internals, which change between releases."""

    def __init__(self, storage: Path, commit: str, sizes: dict[str, int], progress: ByteProgress) -> None:
        self._storage, self._commit, self._sizes, self._progress = storage, commit, sizes, progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            self._progress.update_to(self.bytes_on_disk())

    def bytes_on_disk(self) -> int:
        snapshot = self._storage / "snapshots" / self._commit
        done = sum(size for name, size in self._sizes.items() if (snapshot / name).exists())
        for partial in (self._storage / "blobs").glob("*.incomplete"):
            try:
                stat = partial.stat()
            except FileNotFoundError:  # finished (renamed) meanwhile
                continue
            # Bytes actually written: a transfer that writes ranges in parallel may size the file at once.
            done += min(stat.st_size, stat.st_blocks * 512)
        return done


def _storage_folder(repo_id: str, cache_dir: str | None) -> Path:
    """huggingface_hub's cache layout: <cache>/models--<org>--<name>/{blobs,snapshots/<commit>,refs}."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser() / ("models--" + repo_id.replace("/", "--"))


def _literal(name: str) -> str:
    """An fnmatch pattern matching exactly `name` (allow_patterns are patterns)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[:3]) if text else type(exc).__name__
