"""Cached prefixes beyond the KV cells: a host-memory tier, then a disk tier.

A prefix leaving the cells (LRU eviction, unload, shutdown) is saved with llama.cpp's
per-sequence state (``llama_state_seq_get_data_ext``) as a :class:`Saved` entry: its tokens and
the state's bytes. The host tier keeps entries in memory within ``host_cache_bytes``; what it
evicts goes to the disk tier (one file per entry, written by a thread of its own), which keeps
``disk_cache_bytes`` under ``disk_cache_dir/<fingerprint>/``.

Lookup is by block hashes: every :data:`BLOCK` tokens of an entry's prefix is a chained hash in
one index, so a prompt finds the entry sharing its longest block prefix in a few dict lookups,
and then the exact common prefix. The chain starts from the entry's cache salt (a digest of the
request's ``cache_salt``, see :func:`salt_digest`): a prompt finds only entries saved under its
own salt, so one API key never reuses, or learns of, another key's prefix. Every entry carries
the :func:`fingerprint` of what makes a state valid (the model file, the K/V types, the
llama.cpp build, the attention layout) and a checksum of its salt, its tokens and its bytes: a
file that does not match, is truncated or corrupt (its tokens changed included) is deleted and
never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("backends.llamacpp.kv_tiers")

#: Tokens per hashed block: a saved prefix is found by its first ``k * BLOCK`` tokens.
BLOCK = 64
_MAGIC = b"GWKV2\n"
_HEADER_LEN = struct.Struct("<I")


class Layout(NamedTuple):
    """The context settings a saved state depends on."""

    type_k: str
    type_v: str
    flash_attn: str


def fingerprint(model_path: Path, *, type_k: str, type_v: str, flash_attn: str) -> str:
    """What a saved state is valid for: the model file (size and a hash of its first MiB,
    the GGUF header and metadata), the K/V types, the llama.cpp build, the attention layout
    (V is stored transposed without flash attention)."""
    import llama_cpp

    h = hashlib.blake2b(digest_size=16)
    with model_path.open("rb") as f:
        h.update(f.read(1 << 20))
    h.update(str(model_path.stat().st_size).encode())
    layout = f"{type_k}/{type_v}/{flash_attn}/{llama_cpp.__version__}"
    h.update(layout.encode())
    return h.hexdigest()


def salt_digest(cache_salt: str | None) -> str:
    """The partition a request's ``cache_salt`` names ("" for none): what the cells and the
    tiers keep instead of the salt itself."""
    if cache_salt is None:
        return ""
    return hashlib.blake2b(cache_salt.encode(), digest_size=16, person=b"kv-salt").hexdigest()


def block_hashes(
    tokens: Sequence[int], limit: int | None = None, salt: str = ""
) -> Iterator[tuple[int, str]]:
    """``(k * BLOCK, hash of the salt and the first k * BLOCK tokens)`` for each whole block
    (up to ``limit`` tokens)."""
    end = len(tokens) if limit is None else min(limit, len(tokens))
    h = hashlib.blake2b(salt.encode(), digest_size=16)
    for start in range(0, end - BLOCK + 1, BLOCK):
        h.update(struct.pack(f"<{BLOCK}i", *tokens[start : start + BLOCK]))
        yield start + BLOCK, h.copy().hexdigest()


def _key(tokens: Sequence[int], salt: str = "") -> str:
    packed = struct.pack(f"<{len(tokens)}i", *tokens)
    return hashlib.blake2b(salt.encode() + b"\0" + packed, digest_size=16).hexdigest()


def common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """How many leading tokens ``a`` and ``b`` share (the first ``start`` known equal)."""
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class Saved:
    tokens: tuple[int, ...]
    data: bytes
    #: The :func:`salt_digest` it was cached under ("" for none).
    salt: str = ""

    @property
    def key(self) -> str:
        return _key(self.tokens, self.salt)


@dataclass(frozen=True)
class Found:
    """The saved entry sharing the longest prefix with a prompt: ``n`` tokens of it."""

    key: str
    tokens: tuple[int, ...]
    n: int
    tier: str


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    saved: int = 0
    restored_tokens: int = 0
    #: Time the engine thread spent loading states back into the cells (reading a disk
    #: entry included when it was not prefetched).
    restore_s: float = 0.0
    #: Disk entries read into host memory ahead of their restore, and the time it took (in a
    #: worker thread, not the engine's).
    prefetched: int = 0
    prefetch_s: float = 0.0
    dropped_corrupt: int = 0


@dataclass
class _Index:
    """Entry keys by block hash, and each entry's tokens, for the entries of one tier."""

    tokens: dict[str, tuple[int, ...]] = field(default_factory=dict)
    salts: dict[str, str] = field(default_factory=dict)
    blocks: dict[str, set[str]] = field(default_factory=dict)

    def add(self, key: str, tokens: tuple[int, ...], salt: str) -> None:
        self.tokens[key] = tokens
        self.salts[key] = salt
        for _, h in block_hashes(tokens, salt=salt):
            self.blocks.setdefault(h, set()).add(key)

    def remove(self, key: str) -> None:
        tokens = self.tokens.pop(key, None)
        salt = self.salts.pop(key, "")
        if tokens is None:
            return
        for _, h in block_hashes(tokens, salt=salt):
            keys = self.blocks.get(h)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.blocks[h]

    def dominated(self, tokens: tuple[int, ...], salt: str) -> list[str]:
        """The entries of ``salt`` whose tokens are a prefix of ``tokens`` (a longer entry
        serves every prompt they would, at least as well: the same conversation, saved again
        later)."""
        keys = {k for _, h in block_hashes(tokens, salt=salt) for k in self.blocks.get(h, ())}
        return [
            k for k in keys
            if len(t := self.tokens[k]) < len(tokens) and tokens[: len(t)] == t
        ]  # fmt: skip

    def find(self, prompt: Sequence[int], limit: int, salt: str) -> tuple[str, int] | None:
        """The entry of ``salt`` with the longest common prefix with ``prompt`` (at most
        ``limit``)."""
        candidates: set[str] = set()
        reached = 0
        for n, h in block_hashes(prompt, limit, salt):
            keys = self.blocks.get(h)
            if not keys:
                break
            candidates, reached = keys, n
        if not candidates:
            return None
        shared = {k: common_prefix(self.tokens[k], prompt, reached) for k in candidates}
        best = max(shared, key=shared.__getitem__)
        return best, min(limit, shared[best])


class HostTier:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self.entries: OrderedDict[str, Saved] = OrderedDict()
        self.index = _Index()

    def put(self, key: str, saved: Saved) -> list[Saved]:
        """Keep ``saved``; the entries evicted to stay within the budget (oldest first)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return []
        for old_key in self.index.dominated(saved.tokens, saved.salt):
            self.bytes -= len(self.entries.pop(old_key).data)
            self.index.remove(old_key)
        self.entries[key] = saved
        self.index.add(key, saved.tokens, saved.salt)
        self.bytes += len(saved.data)
        evicted = []
        while self.bytes > self.budget and self.entries:
            old_key, old = self.entries.popitem(last=False)
            self.index.remove(old_key)
            self.bytes -= len(old.data)
            evicted.append(old)
        return evicted

    def get(self, key: str) -> Saved | None:
        saved = self.entries.get(key)
        if saved is not None:
            self.entries.move_to_end(key)
        return saved


def _private_dirs(path: Path) -> None:
    """``path`` and the parents it lacks, each made 0700 (one that exists is left as it is)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)


class DiskTier:
    """One file per entry: a magic line, a JSON header (fingerprint, salt, tokens, size, and the
    checksum of the salt, the tokens and the state), the state's bytes; the file is named by
    the hash of its salt and tokens. Written as a temporary file renamed into place (a
    reader never sees half a file; two processes on one directory each write whole files),
    by a writer thread.
    Another process may delete a file this one indexed: that is a miss. The entries hold
    prompts' tokens: the folders this creates are private (0700), the files too (0600)."""

    def __init__(self, root: Path, fp: str, budget: int) -> None:
        self.dir = root / fp
        self.fp = fp
        self.budget = budget
        self.bytes = 0
        self.sizes: OrderedDict[str, int] = OrderedDict()
        self.index = _Index()
        self.stats = TierStats()
        self.broken = False
        self._lock = threading.Lock()
        self._queue: queue.Queue[Saved | None] = queue.Queue(maxsize=64)
        try:
            _private_dirs(self.dir)
            self._scan()
        except OSError as err:
            self._fail(err)
        self._writer = threading.Thread(target=self._write_loop, name="kv disk tier", daemon=True)
        self._writer.start()

    def _fail(self, err: OSError) -> None:
        if not self.broken:
            log.error("KV disk tier %s disabled: %s", self.dir, err)
        self.broken = True

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.kv"

    def _scan(self) -> None:
        for tmp in self.dir.glob(".*.tmp"):  # a write a killed process left (an hour old)
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
        files = sorted(self.dir.glob("*.kv"), key=lambda p: p.stat().st_mtime)
        for path in files:
            saved = self._read(path, body=False)
            if saved is None:
                self._drop(path)
                continue
            self.sizes[saved.key] = path.stat().st_size
            self.bytes += self.sizes[saved.key]
            self.index.add(saved.key, saved.tokens, saved.salt)
        self._bound()

    def _read(self, path: Path, *, body: bool) -> Saved | None:
        """The file's entry (without ``body``, its state's bytes left out), or None if it is
        not a whole entry of this fingerprint: its name is the hash of its salt and tokens,
        and (with ``body``) its checksum covers them and the state's bytes."""
        try:
            with path.open("rb") as f:
                if f.read(len(_MAGIC)) != _MAGIC:
                    return None
                (n,) = _HEADER_LEN.unpack(f.read(_HEADER_LEN.size))
                header = json.loads(f.read(n))
                data = f.read() if body else b""
        except (OSError, ValueError, struct.error):
            return None
        if not (isinstance(header, dict) and header.get("fingerprint") == self.fp):
            return None
        tokens, salt = header.get("tokens"), header.get("salt")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            return None
        if not isinstance(salt, str):
            return None
        saved = Saved(tuple(tokens), data, salt)
        if path.stem != saved.key:
            return None
        whole = header.get("nbytes") == len(data) and header.get("sha256") == _checksum(saved)
        return saved if whole or not body else None

    def _drop(self, path: Path) -> None:
        self.stats.dropped_corrupt += 1
        log.warning("KV disk tier: %s is not a valid entry here, deleted", path.name)
        path.unlink(missing_ok=True)

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self.sizes

    def put(self, saved: Saved, *, wait: bool = False) -> None:
        """Queue ``saved`` for writing unless it is on disk already; without ``wait``,
        dropped if the writer is that far behind (a decode step never waits for a disk)."""
        if self.broken or self.has(saved.key):
            return
        try:
            self._queue.put(saved, block=wait)
        except queue.Full:
            log.warning("KV disk tier: writer behind, %d tokens not saved", len(saved.tokens))

    def flush(self) -> None:
        """Wait until every queued entry is written."""
        self._queue.join()

    def _write_loop(self) -> None:
        while (saved := self._queue.get()) is not None:
            try:
                self._write(saved)
            except OSError as err:
                self._fail(err)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, saved: Saved) -> None:
        if self.broken:
            return
        key = saved.key
        header = json.dumps(
            {
                "fingerprint": self.fp,
                "salt": saved.salt,
                "tokens": list(saved.tokens),
                "nbytes": len(saved.data),
                "sha256": _checksum(saved),
            }
        ).encode()
        head = _MAGIC + _HEADER_LEN.pack(len(header)) + header
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            f.write(head)
            f.write(saved.data)
        os.replace(tmp, self._path(key))
        size = len(head) + len(saved.data)
        with self._lock:
            for old_key in self.index.dominated(saved.tokens, saved.salt):
                self._forget(old_key)
            if key not in self.sizes:
                self.index.add(key, saved.tokens, saved.salt)
            self.bytes += size - self.sizes.get(key, 0)
            self.sizes[key] = size
            self.sizes.move_to_end(key)
            self._bound()
        self.stats.saved += 1

    def _unindex(self, key: str) -> None:
        """Forget an entry (under the lock); its file is the caller's."""
        self.bytes -= self.sizes.pop(key, 0)
        self.index.remove(key)

    def _forget(self, key: str) -> None:
        """Drop an entry and its file (under the lock)."""
        self._unindex(key)
        self._path(key).unlink(missing_ok=True)

    def _bound(self) -> None:
        while self.bytes > self.budget and self.sizes:
            self._forget(next(iter(self.sizes)))

    def find(self, prompt: Sequence[int], limit: int, salt: str = "") -> tuple[str, int] | None:
        with self._lock:
            return self.index.find(prompt, limit, salt)

    def tokens_of(self, key: str) -> tuple[int, ...]:
        with self._lock:
            return self.index.tokens[key]

    def load(self, key: str) -> Saved | None:
        """The entry's state, checked whole; a bad file is deleted, a missing one (another
        process's budget took it) forgotten."""
        path = self._path(key)
        read = self._read(path, body=True)
        with self._lock:
            if read is None:
                self._unindex(key)
            elif key in self.sizes:
                self.sizes.move_to_end(key)
        if read is None:
            if path.exists():
                self._drop(path)
            return None
        return read

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._writer.join()


def _checksum(saved: Saved) -> str:
    """What a disk entry's header vouches for: its salt, its tokens and the state's bytes."""
    h = hashlib.sha256(saved.salt.encode() + b"\0")
    h.update(struct.pack(f"<{len(saved.tokens)}i", *saved.tokens))
    h.update(saved.data)
    return h.hexdigest()


class KVTiers:
    """The tiers below a model's KV cells; it outlives the engine (an unloaded model's
    prefixes wait in host memory for the reload). The engine thread saves, finds and loads;
    :meth:`prefetch` runs in a worker thread (the lock keeps the host tier whole)."""

    def __init__(self, host: HostTier | None, disk: DiskTier | None) -> None:
        self.host = host
        self.disk = disk
        self.stats = TierStats()
        self._lock = threading.RLock()

    def save(self, saved: Saved) -> None:
        with self._lock:
            self.stats.saved += 1
            self._keep(saved.key, saved)

    def _keep(self, key: str, saved: Saved) -> None:
        host = self.host
        spilled = host.put(key, saved) if host is not None else [saved]
        if self.disk is not None:
            for entry in spilled:
                self.disk.put(entry)

    def on_disk(self, prompt: Sequence[int], salt: str = "") -> Found | None:
        """The disk entry ``prompt`` would be restored from, if the host tier has nothing as
        good and there is a host tier to read it into (a lookup: no I/O)."""
        if self.host is None or self.disk is None:
            return None
        found = self.find(prompt, len(prompt) - 1, salt)
        return found if found is not None and found.tier == "disk" else None

    def prefetch(self, found: Found) -> bool:
        """Read ``found`` (from :meth:`on_disk`) into the host tier, in a worker thread before
        the request reaches the engine, so that the engine thread's restore is a copy from
        memory, not a file read. False if the file was gone or bad."""
        assert self.disk is not None
        started = time.perf_counter()
        saved = self.disk.load(found.key)
        if saved is None:
            return False
        with self._lock:
            self._keep(found.key, saved)
            self.stats.prefetched += 1
            self.stats.prefetch_s += time.perf_counter() - started
        return True

    def find(self, prompt: Sequence[int], limit: int, salt: str = "") -> Found | None:
        """The saved prefix of ``salt`` sharing the most tokens with ``prompt`` (host before
        disk)."""
        with self._lock:
            return self._find(prompt, limit, salt)

    def _find(self, prompt: Sequence[int], limit: int, salt: str) -> Found | None:
        best: Found | None = None
        if self.host is not None and (hit := self.host.index.find(prompt, limit, salt)):
            key, n = hit
            best = Found(key, self.host.index.tokens[key], n, "host")
        if (
            self.disk is not None
            and not self.disk.broken
            and (hit := self.disk.find(prompt, limit, salt))
        ):
            key, n = hit
            if best is None or n > best.n:
                best = Found(key, self.disk.tokens_of(key), n, "disk")
        return best

    def load(self, found: Found) -> bytes | None:
        with self._lock:
            saved = self.host.get(found.key) if found.tier == "host" and self.host else None
        if saved is None and found.tier == "disk" and self.disk is not None:
            saved = self.disk.load(found.key)
        with self._lock:
            if saved is None:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            self.stats.restored_tokens += found.n
        return saved.data

    def usage(self) -> dict[str, object]:
        """What each tier holds, for ``/admin/models``."""
        with self._lock:
            return self._usage()

    def _usage(self) -> dict[str, object]:
        out: dict[str, object] = {**asdict(self.stats)}
        if self.host is not None:
            out["host"] = {
                "bytes": self.host.bytes, "budget_bytes": self.host.budget,
                "entries": len(self.host.entries),
            }  # fmt: skip
        if self.disk is not None:
            out["disk"] = {
                "bytes": self.disk.bytes, "budget_bytes": self.disk.budget,
                "entries": len(self.disk.sizes), "dir": str(self.disk.dir),
                "disabled": self.disk.broken, "dropped_corrupt": self.disk.stats.dropped_corrupt,
            }  # fmt: skip
        return out

    def persist(self) -> None:
        """Queue every host entry for the disk tier (the model is unloading: if the process
        ends, the host tier goes with it)."""
        if self.host is not None and self.disk is not None:
            with self._lock:
                entries = list(self.host.entries.values())
            for saved in entries:
                self.disk.put(saved, wait=True)

    def flush(self) -> None:
        if self.disk is not None:
            self.disk.flush()

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


def open_tiers(
    model_path: Path, *, host_bytes: int, disk_bytes: int, disk_dir: Path, layout: Layout
) -> KVTiers | None:
    """The configured tiers (None if both are off)."""
    if not host_bytes and not disk_bytes:
        return None
    host = HostTier(host_bytes) if host_bytes else None
    disk = None
    if disk_bytes:
        fp = fingerprint(model_path, **layout._asdict())
        disk = DiskTier(disk_dir, fp, disk_bytes)
    return KVTiers(host, disk)


@dataclass
class SharedTiers:
    """One model's tiers, shared by its successive backends (the pool makes a new backend
    for each load; the tiers outlive them all). Opened on the first load."""

    tiers: KVTiers | None = None
    opened: bool = False
