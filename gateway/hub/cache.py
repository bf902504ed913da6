"""The Hugging Face cache as ``gateway models --cached`` and ``gateway rm`` see it
(``huggingface_hub.scan_cache_dir`` and its ``delete_revisions``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CachedRepoInfo, HFCacheInfo, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from gateway.hub.errors import HubError
from gateway.hub.fetch import hub_cache
from gateway.hub.spec import HubSource, select_gguf


@dataclass(frozen=True)
class CachedModel:
    repo: str
    revision: str
    refs: tuple[str, ...]
    size_bytes: int
    files: tuple[str, ...]
    path: Path


def _scan() -> HFCacheInfo | None:
    try:
        return scan_cache_dir(hub_cache())
    except CacheNotFound:
        return None


def cached_models() -> list[CachedModel]:
    """Every model revision in the cache, largest repos first."""
    info = _scan()
    if info is None:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: (-r.size_on_disk, r.repo_id)):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            names = tuple(sorted(f.file_name for f in rev.files))
            out.append(
                CachedModel(
                    repo.repo_id,
                    rev.commit_hash,
                    tuple(sorted(rev.refs)),
                    rev.size_on_disk,
                    names,
                    rev.snapshot_path,
                )
            )
    return out


def _repo(info: HFCacheInfo, name: str) -> CachedRepoInfo:
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id.lower() == name.lower():
            return repo
    raise HubError(f"{name} is not in the Hugging Face cache ({hub_cache()})")


def remove(source: HubSource) -> int:
    """Remove a repo (every revision), or only the GGUF files a quant or file names; returns
    the bytes freed."""
    info = _scan()
    if info is None:
        raise HubError(f"{source.repo} is not in the Hugging Face cache ({hub_cache()})")
    repo = _repo(info, source.repo)
    if source.file is None and source.quant is None:
        strategy = info.delete_revisions(*(r.commit_hash for r in repo.revisions))
        strategy.execute()
        return strategy.expected_freed_size
    return _remove_files(repo, source)


def _remove_files(repo: CachedRepoInfo, source: HubSource) -> int:
    """Unlink one quant's files from every revision, and their blobs once nothing links them."""
    doomed = []
    for rev in repo.revisions:
        try:
            picked = select_gguf(source, [f.file_name for f in rev.files])
        except HubError:
            continue
        doomed += [f for f in rev.files if f.file_name in picked.files]
    if not doomed:
        raise HubError(f"{source.label}: no such files in the Hugging Face cache")
    for f in doomed:
        f.file_path.unlink(missing_ok=True)
    linked = {p.resolve() for p in (repo.repo_path / "snapshots").rglob("*") if p.is_symlink()}
    freed = 0
    for blob in {f.blob_path for f in doomed}:
        if blob not in linked and blob.exists():
            freed += blob.stat().st_size
            blob.unlink()
    return freed
