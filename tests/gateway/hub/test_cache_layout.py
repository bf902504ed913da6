"""What gateway/hub/fetch.py shares with huggingface_hub's own download: the blob and lock
paths (it uses file_download.repo_folder_name and http_get, which are not public API; pyproject
pins the minor release this is checked on), and its waits: a lock another process holds and a
large file's hash stop when the download is cancelled."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from huggingface_hub import file_download, hf_hub_download

import gateway.hub.fetch as fetching
from gateway.hub import DownloadCancelled, DownloadProgress, parse_spec
from gateway.hub.fetch import RemoteFile, fetch, verify
from tests.gateway.hub.conftest import TINY_REPO, Hub

pytestmark = pytest.mark.timeout(60)
NAME = "Tiny-Q4_K_M.gguf"


def _recording(real: Any, seen: list[Path]) -> Any:
    @contextmanager
    def lock(path: str, **kwargs: Any) -> Iterator[Any]:
        seen.append(Path(path))
        with real(path, **kwargs) as held:
            yield held

    return lock


def test_blob_and_lock_paths_are_the_library_s(hub: Hub) -> None:
    theirs: list[Path] = []
    with pytest.MonkeyPatch.context() as patch:
        real = getattr(file_download, "WeakFileLock")  # noqa: B009 (not re-exported for mypy)
        patch.setattr(file_download, "WeakFileLock", _recording(real, theirs))
        hf_hub_download(TINY_REPO, NAME)
    repo = hub.cache / "models--test-org--Tiny-GGUF"
    their_blobs = sorted(p.relative_to(hub.cache) for p in (repo / "blobs").iterdir())
    shutil.rmtree(repo)
    shutil.rmtree(hub.cache / ".locks")

    ours: list[Path] = []
    real = getattr(fetching, "WeakFileLock")  # noqa: B009
    hub.monkeypatch.setattr(fetching, "WeakFileLock", _recording(real, ours))
    fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"))
    our_blobs = sorted(p.relative_to(hub.cache) for p in (repo / "blobs").iterdir())
    assert our_blobs == their_blobs
    assert ours and set(ours) <= set(theirs)


def test_a_wait_for_a_held_lock_stops_when_cancelled(hub: Hub) -> None:
    hub.monkeypatch.setattr(fetching, "LOCK_POLL_S", 0.1)
    fetch(parse_spec(f"{TINY_REPO}:Q4_0"))  # the repo's lock folder exists
    sha = next(f.sha256 for f in hub.state.repos[TINY_REPO].values() if f.path.name == "tiny.gguf")
    lock = hub.cache / ".locks" / "models--test-org--Tiny-GGUF" / f"{sha}.lock"
    progress = DownloadProgress("m")
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"), progress)
        except BaseException as err:
            failure.append(err)

    with FileLock(str(lock)):  # another process downloading the same blob
        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive()  # waiting for the lock
        progress.cancel()
        worker.join(5)
        assert not worker.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], DownloadCancelled)


def test_hashing_stops_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(20 << 20))
    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise DownloadCancelled("stopped")

    with pytest.raises(DownloadCancelled):
        verify(path, RemoteFile("f", 20 << 20, sha256="0" * 64), check)
    assert calls == 2
