"""Resolving a :class:`HubSource` to files in the standard Hugging Face cache, and fetching them.

Everything goes through ``huggingface_hub``: the repo's file list, sizes and hashes
(``HfApi.model_info``), the cache layout, its locks (two processes never fetch one file twice),
``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``. One thing is
added: a plain-HTTP download is resumed after an interrupt (the library keeps no partial file
across processes, only Xet storage resumes): it goes to ``blobs/<etag>.incomplete`` under the
library's lock for that blob, and is moved into place only once its size and hash match the
Hub's metadata, so a failed, cut or corrupt download is never a file that gets loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from filelock import Timeout
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# http_get (a resumable GET into a file we hold) and repo_folder_name (the cache's folder name)
# have no public equivalent: pyproject pins huggingface_hub to 2.4.x, and a test checks that our
# blob and lock paths are the ones hf_hub_download uses.
from huggingface_hub.file_download import (
    get_hf_file_metadata,
    hf_hub_url,
    http_get,
    repo_folder_name,
)

# public (in huggingface_hub.utils.__all__, which is built at run time: mypy cannot see it)
from huggingface_hub.utils import (  # type: ignore[attr-defined]
    WeakFileLock,
    build_hf_headers,
)

from gateway.hub.errors import DownloadCancelled, HubError, NotDownloaded
from gateway.hub.progress import DownloadProgress
from gateway.hub.spec import HubSource, select_gguf

#: Free space kept beyond a download's size (the cache's filesystem is not filled to the brim).
DISK_MARGIN_BYTES = 64 << 20
_CHUNK = 8 << 20
#: How often a wait for another process's lock on a blob checks whether it was cancelled.
LOCK_POLL_S = 1.0


def hub_cache() -> Path:
    """The Hugging Face cache folder (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def _storage(repo: str) -> Path:
    return hub_cache() / repo_folder_name(repo_id=repo, repo_type="model")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo as the Hub describes it."""

    name: str
    size: int
    #: The LFS object's sha256 (large files), else None.
    sha256: str | None = None
    #: The git blob id (sha1 of ``blob <size>\\0<bytes>``): what small files are checked by.
    blob_id: str | None = None


@dataclass(frozen=True)
class Resolved:
    """A source pinned to a commit: the files it needs and a vision projector beside them."""

    source: HubSource
    commit: str
    files: tuple[RemoteFile, ...]
    mmproj: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def primary(self) -> str:
        return self.files[0].name

    def local_path(self) -> Path:
        """Where the model is once fetched: its (first) GGUF, or the snapshot folder."""
        snapshot = _storage(self.source.repo) / "snapshots" / self.commit
        return snapshot / self.primary if self.source.kind == "gguf" else snapshot


def _hub_error(source: HubSource, err: Exception) -> HubError:
    repo, what = source.repo, source.label
    if isinstance(err, GatedRepoError):
        return HubError(f"{repo} is a gated repo: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(err, RepositoryNotFoundError):
        return HubError(f"{repo}: no such model repo on the Hub (a private one needs HF_TOKEN)")
    if isinstance(err, RevisionNotFoundError):
        return HubError(f"{repo}: no revision {source.revision!r} on the Hub")
    if isinstance(err, EntryNotFoundError):
        return HubError(f"{what}: a file is missing on the Hub ({_first_line(err)})")
    if isinstance(err, HfHubHTTPError):
        return HubError(f"{what}: the Hub answered: {_first_line(err)}")
    return HubError(f"{what}: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unreachable(err: Exception) -> bool:
    return isinstance(err, OfflineModeIsEnabled | httpx2.TransportError)


def resolve(source: HubSource) -> Resolved:
    """Ask the Hub for the files ``source`` means, with their sizes and hashes."""
    api = HfApi(endpoint=constants.ENDPOINT)
    try:
        info = api.model_info(source.repo, revision=source.revision, files_metadata=True)
    except Exception as err:
        if _unreachable(err) or (isinstance(err, OSError) and not isinstance(err, HfHubHTTPError)):
            raise NotDownloaded(
                f"{source.label}: the Hub cannot be reached ({_first_line(err)})"
            ) from err
        raise _hub_error(source, err) from err
    if info.sha is None:
        raise HubError(f"{source.label}: the Hub gave no commit for revision {source.revision!r}")
    siblings = {s.rfilename: s for s in info.siblings or []}
    mmproj = None
    if source.kind == "gguf":
        selection = select_gguf(source, siblings)
        names, mmproj = selection.files, selection.mmproj
    else:
        names = tuple(sorted(siblings))
        if not names:
            raise HubError(f"{source.label}: the repo has no files")
    files = []
    for name in names:
        s = siblings[name]
        size = s.lfs.size if s.lfs is not None else s.size
        if size is None:
            raise HubError(f"{source.label}: the Hub gave no size for {name}")
        files.append(RemoteFile(name, size, s.lfs.sha256 if s.lfs else None, s.blob_id))
    return Resolved(source, info.sha, tuple(files), mmproj)


def _cached_commit(source: HubSource) -> str | None:
    storage = _storage(source.repo)
    ref = storage / "refs" / source.revision
    if ref.is_file():
        return ref.read_text().strip()
    if (storage / "snapshots" / source.revision).is_dir():
        return source.revision
    return None


def cached_path(source: HubSource) -> Path | None:
    """The model's local path if its files are in the cache (no network), else None."""
    commit = _cached_commit(source)
    if commit is None:
        return None
    snapshot = _storage(source.repo) / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    if source.kind == "folder":
        return snapshot if _folder_complete(source.repo, commit, snapshot) else None
    names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    try:
        selection = select_gguf(source, names)
    except HubError:
        return None
    return snapshot / selection.primary


def _marker(repo: str, commit: str) -> Path:
    """Where a folder fetched whole lists its files (beside the library's locks, which
    ``scan_cache_dir`` skips)."""
    return hub_cache() / ".locks" / _storage(repo).name / f"{commit}.gateway-complete.json"


def _mark_complete(resolved: Resolved) -> None:
    marker = _marker(resolved.source.repo, resolved.commit)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({f.name: f.size for f in resolved.files}))
    os.replace(tmp, marker)


def _folder_complete(repo: str, commit: str, snapshot: Path) -> bool:
    """Every file of the folder is in the snapshot: the list the gateway wrote when it fetched
    it; without one (another tool fetched it), config.json and every weight file its index
    names, with no download of the repo left unfinished."""
    try:
        listed = json.loads(_marker(repo, commit).read_text())
    except (OSError, ValueError):
        listed = None
    if isinstance(listed, dict):
        return all(
            (snapshot / name).is_file() and (snapshot / name).stat().st_size == size
            for name, size in listed.items()
        )
    if any((_storage(repo) / "blobs").glob("*.incomplete")):
        return False
    if not (snapshot / "config.json").is_file():
        return False
    weights: set[str] = set()
    for index in snapshot.glob("*.safetensors.index.json"):
        try:
            weights |= set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
    if not weights:
        weights = {p.name for p in snapshot.glob("*.safetensors")}
    return bool(weights) and all((snapshot / w).is_file() for w in weights)


def _hash_file(path: Path, h: hashlib._Hash, check: Callable[[], None] | None) -> str:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            if check is not None:
                check()  # a shutdown does not wait for a large file's hash
            h.update(chunk)
    return h.hexdigest()


def _git_blob_sha1(path: Path, check: Callable[[], None] | None = None) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    return _hash_file(path, h, check)


def _sha256(path: Path, check: Callable[[], None] | None = None) -> str:
    return _hash_file(path, hashlib.sha256(), check)


def verify(path: Path, remote: RemoteFile, check: Callable[[], None] | None = None) -> str | None:
    """Why ``path`` is not ``remote`` (size, then sha256 or git blob id), or None if it is.
    ``check`` is called between chunks (it raises to stop)."""
    size = path.stat().st_size
    if size != remote.size:
        return f"{size} bytes, the Hub says {remote.size}"
    if remote.sha256 is not None:
        got = _sha256(path, check)
        return None if got == remote.sha256 else f"sha256 {got}, the Hub says {remote.sha256}"
    if remote.blob_id is not None:
        got = _git_blob_sha1(path, check)
        return None if got == remote.blob_id else f"git blob {got}, the Hub says {remote.blob_id}"
    return None


@contextmanager
def _blob_lock(lock: Path, progress: DownloadProgress) -> Iterator[None]:
    """The library's lock on a blob (another process may hold it for a long download): waited
    for in steps of :data:`LOCK_POLL_S`, stopping if the download is cancelled meanwhile."""
    with ExitStack() as stack:
        while True:
            progress.check_cancelled()
            try:
                stack.enter_context(WeakFileLock(str(lock), timeout=LOCK_POLL_S))
            except Timeout:
                continue
            break
        yield


def _check_space(folder: Path, need: int, label: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + DISK_MARGIN_BYTES:
        raise HubError(
            f"{label}: not enough disk space in {folder}: needs {need} bytes more, {free} free"
        )


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


def _hub_host(url: str, location: str) -> bool:
    """Whether ``location`` (where ``url`` redirects) is the Hub itself: the same origin, or the
    endpoint's (as ``huggingface_hub``'s own download decides whether the token goes along)."""
    hub = {_origin(url), _origin(constants.ENDPOINT), _origin("https://huggingface.co")}
    return _origin(location) in hub | {_origin("https://hf.co")}


def _download_blob(resolved: Resolved, remote: RemoteFile, progress: DownloadProgress) -> None:
    """Fetch one file's blob into the cache (resuming a partial one), verified, under its lock."""
    source = resolved.source
    url = hf_hub_url(
        source.repo, remote.name, revision=resolved.commit, endpoint=constants.ENDPOINT
    )
    headers = build_hf_headers()
    meta = get_hf_file_metadata(url, headers=headers, endpoint=constants.ENDPOINT)
    if not _hub_host(url, meta.location):  # a CDN (signed URL): HF_TOKEN stays with the Hub
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    if meta.etag is None:
        raise HubError(f"{source.label}: the Hub gave no ETag for {remote.name}")
    if meta.xet_file_data is not None:  # Xet storage: the library resumes through its own cache
        progress.begin_file(remote.name)
        hf_hub_download(
            source.repo, remote.name, revision=resolved.commit,
            tqdm_class=progress.tqdm_class(), endpoint=constants.ENDPOINT,
        )  # fmt: skip
        return
    storage = _storage(source.repo)
    blob = storage / "blobs" / meta.etag
    lock = hub_cache() / ".locks" / storage.name / f"{meta.etag}.lock"
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with _blob_lock(lock, progress):
        if blob.exists():  # another process fetched it while we waited for the lock
            progress.begin_file(remote.name, remote.size)
            return
        partial = blob.with_name(f"{meta.etag}.incomplete")
        have = partial.stat().st_size if partial.exists() else 0
        if have > remote.size:
            partial.unlink()
            have = 0
        progress.begin_file(remote.name, have)
        _check_space(blob.parent, remote.size - have, f"{source.label}: {remote.name}")
        try:
            with partial.open("ab") as f:
                http_get(
                    meta.location, f, resume_size=have, headers=headers,
                    expected_size=remote.size, displayed_filename=remote.name,
                    tqdm_class=progress.tqdm_class(),
                )  # fmt: skip
        except DownloadCancelled:
            raise
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise HubError(
                    f"{source.label}: writing {remote.name} failed: {err.strerror} "
                    f"(the partial file is kept: free some space and fetch it again)"
                ) from err
            # http_get's own size check is a bare OSError (no errno)
            if isinstance(err, HfHubHTTPError) or (type(err) is OSError and err.errno is None):
                raise HubError(
                    f"{source.label}: downloading {remote.name} failed: {_first_line(err)}"
                ) from err
            raise HubError(f"{source.label}: {remote.name}: {_first_line(err)}") from err
        except Exception as err:
            if _unreachable(err):
                raise HubError(
                    f"{source.label}: downloading {remote.name} was cut off ({_first_line(err)}); "
                    "fetch it again to resume"
                ) from err
            raise
        problem = verify(partial, remote, progress.check_cancelled)
        if problem is not None:
            partial.unlink(missing_ok=True)
            raise HubError(
                f"{source.label}: {remote.name} downloaded corrupt ({problem}); it was deleted"
            )
        os.chmod(partial, 0o644)
        os.replace(partial, blob)


def _place(resolved: Resolved, remote: RemoteFile, progress: DownloadProgress) -> Path:
    """One file in the snapshot folder: already there, or fetched, checked and linked."""
    source = resolved.source
    pointer = _storage(source.repo) / "snapshots" / resolved.commit / remote.name
    if pointer.exists() and pointer.stat().st_size == remote.size:
        progress.begin_file(remote.name, remote.size)
        return pointer
    _download_blob(resolved, remote, progress)
    # the blob is in place: the library links it into the snapshot of the commit resolved (not
    # the branch: it may have moved since), and fetch() points refs/<revision> at that commit
    found = hf_hub_download(
        source.repo, remote.name, revision=resolved.commit, endpoint=constants.ENDPOINT
    )
    assert isinstance(found, str)
    path = Path(found)
    if path != pointer or path.stat().st_size != remote.size:
        raise HubError(f"{source.label}: {remote.name} in the cache is not the Hub's file")
    return path


def _write_ref(resolved: Resolved) -> None:
    """``refs/<revision>``: the commit the files were fetched at (as the library writes it)."""
    revision = resolved.source.revision
    if revision == resolved.commit:
        return
    ref = _storage(resolved.source.repo) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text().strip() == resolved.commit:
        return
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(resolved.commit)
    os.replace(tmp, ref)


def fetch(source: HubSource, progress: DownloadProgress | None = None) -> Path:
    """The model's local path, fetched into the Hugging Face cache if needed.

    Offline (``HF_HUB_OFFLINE``, or the Hub unreachable) a cached copy is used; otherwise the
    Hub's metadata decides what is fetched and every file is checked against it.
    """
    progress = progress or DownloadProgress(source.label)
    try:
        if offline():
            return _from_cache(source, "HF_HUB_OFFLINE is set")
        try:
            resolved = resolve(source)
        except NotDownloaded as err:
            return _from_cache(source, str(err))
        progress.plan(resolved.total_bytes)
        progress.mmproj = resolved.mmproj
        try:
            for remote in resolved.files:
                _place(resolved, remote, progress)
            _write_ref(resolved)
            if source.kind == "folder":
                _mark_complete(resolved)
        except (HubError, DownloadCancelled):
            raise
        except Exception as err:
            raise _hub_error(source, err) from err
        return resolved.local_path()
    finally:
        progress.finish()


def _from_cache(source: HubSource, why: str) -> Path:
    path = cached_path(source)
    if path is None:
        raise NotDownloaded(f"{source.label}: not downloaded, and {why}")
    return path
