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
llama.cpp build, the attention layout) and checksums of its salt, its tokens and its bytes: a
file that does not match, is truncated or corrupt (its tokens changed included) is deleted and
never loaded.

A disk entry is checked where it costs the request nothing: the writer thread lays the state
out (its cells in position order, see :func:`_state_layout`) and checksums it, the header when
the folder is scanned; a restore reads only the bytes it restores and checks only them, with
xxHash (XXH3, ~15 GB/s where SHA-256 did ~1.5): the whole state when the prompt shares (most
of) the entry, else the cells of the shared prefix, :data:`CHUNK` by :data:`CHUNK`.
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

from backends.llamacpp.native import load_llama_cpp
from gateway.kv_events.events import KVEventSink
from gateway.kv_events.ledger import BlockLedger

log = logging.getLogger("backends.llamacpp.kv_tiers")

#: Tokens per hashed block: a saved prefix is found by its first ``k * BLOCK`` tokens.
BLOCK = 64
#: Cells per checksum of a disk entry's state: a prefix is read and checked in whole chunks.
CHUNK = 64
#: The disk format: v3 checksums with XXH3 (v2, SHA-256 over the whole file, is deleted).
_MAGIC = b"GWKV3\n"
_FAMILY = b"GWKV"
#: After the magic: the header's length and its XXH3 checksum.
_PREFIX = struct.Struct("<IQ")
#: The first read of a file: its magic, prefix and (most often) its whole header.
_HEAD_READ = 1 << 16


class Layout(NamedTuple):
    """The context settings a saved state depends on."""

    type_k: str
    type_v: str
    flash_attn: str


def fingerprint(model_path: Path, *, type_k: str, type_v: str, flash_attn: str) -> str:
    """What a saved state is valid for: the model file (size and a hash of its first MiB,
    the GGUF header and metadata), the K/V types, the llama.cpp build, the attention layout
    (V is stored transposed without flash attention)."""
    llama_cpp = load_llama_cpp()
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
    #: The tier's blocks as routers see them (KV events), once announced.
    ledger: BlockLedger | None = None

    def announce(self, ledger: BlockLedger) -> None:
        """Publish the entries held now, then every change (to ``ledger`` only: a ledger
        announced before lets go of them)."""
        if self.ledger is not None:
            self.ledger.clear()
        self.ledger = ledger
        for key, tokens in self.tokens.items():
            ledger.hold(key, tokens, self.salts[key])

    def add(self, key: str, tokens: tuple[int, ...], salt: str) -> None:
        if self.ledger is not None:
            self.ledger.hold(key, tokens, salt)
        self.tokens[key] = tokens
        self.salts[key] = salt
        for _, h in block_hashes(tokens, salt=salt):
            self.blocks.setdefault(h, set()).add(key)

    def remove(self, key: str) -> None:
        tokens = self.tokens.pop(key, None)
        salt = self.salts.pop(key, "")
        if tokens is None:
            return
        if self.ledger is not None:
            self.ledger.drop(key)
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
        dominated = self.index.dominated(saved.tokens, saved.salt)
        self.entries[key] = saved
        self.index.add(key, saved.tokens, saved.salt)  # first: its blocks never leave the tier
        self.bytes += len(saved.data)
        for old_key in dominated:
            self.bytes -= len(self.entries.pop(old_key).data)
            self.index.remove(old_key)
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


class _Segment(NamedTuple):
    """A run of a state's bytes: ``fixed`` (kept as they are), ``count`` (the 4-byte number of
    cells, rewritten for a prefix) or ``cells`` (``size`` bytes per cell, cell after cell)."""

    kind: str
    offset: int
    size: int


@dataclass(frozen=True)
class _Layout:
    """Where a disk entry's state keeps each cell (positions 0..``cells``-1, in order), so that
    a prefix is read alone: ``sums[0]`` checks the fixed bytes, ``sums[1 + c]`` the cells of
    chunk ``c`` (:data:`CHUNK` cells, every ``cells`` segment's share of them)."""

    cells: int
    chunk: int
    segments: tuple[_Segment, ...]
    sums: tuple[int, ...]


class _Header(NamedTuple):
    tokens: tuple[int, ...]
    salt: str
    nbytes: int
    #: The XXH3 of the whole state (seeded with the entry's key).
    digest: int
    layout: _Layout | None
    #: Where the state starts in the file.
    start: int


_U32 = struct.Struct("<I")
#: A cell's metadata in a sequence state: its position, its number of sequence ids (1), the id.
_CELL = struct.Struct("<iIi")
#: A layer's K (or V) type and row size, before its rows.
_ROWS = struct.Struct("<iQ")
#: llama.cpp's sequence-state magic and the id of the sequence saved, before the cache's state.
_SEQ_PREAMBLE = 8


def _state_layout(data: bytes, n_cells: int) -> tuple[bytes, tuple[_Segment, ...]] | None:
    """``data`` (a sequence state of llama.cpp's KV cache) with its cells in position order,
    and where each cell's bytes lie in it; None if it is not laid out as a prefix can be cut
    from: one stream of ``n_cells`` cells at positions 0..n-1, each layer's K then V rows cell
    by cell (V transposed, without flash attention, is not), nothing after them. Another
    layout (a recurrent or sliding-window model's, another llama.cpp's) is restored whole."""
    segments: list[_Segment] = []
    meta = -1
    try:
        off = _SEQ_PREAMBLE
        (n_stream,) = _U32.unpack_from(data, off)
        off += _U32.size
        segments.append(_Segment("fixed", 0, off))
        for _ in range(n_stream):
            (count,) = _U32.unpack_from(data, off)
            if count == 0:
                segments.append(_Segment("fixed", off, _U32.size))
                off += _U32.size
                continue
            if meta >= 0 or count != n_cells:
                return None
            segments.append(_Segment("count", off, _U32.size))
            meta = off + _U32.size
            segments.append(_Segment("cells", meta, _CELL.size))
            off = meta + count * _CELL.size
            v_trans, n_layer = struct.unpack_from("<II", data, off)
            if v_trans != 0 or n_layer == 0:
                return None
            segments.append(_Segment("fixed", off, 8))
            off += 8
            for _ in range(2 * n_layer):  # every layer's K rows, then every layer's V rows
                _, row = _ROWS.unpack_from(data, off)
                if row == 0 or off + _ROWS.size + count * row > len(data):
                    return None
                segments.append(_Segment("fixed", off, _ROWS.size))
                segments.append(_Segment("cells", off + _ROWS.size, row))
                off += _ROWS.size + count * row
    except struct.error:
        return None
    if meta < 0 or off != len(data):
        return None
    cells = list(_CELL.iter_unpack(data[meta : meta + n_cells * _CELL.size]))
    if any(n_seq != 1 for _, n_seq, _ in cells):
        return None
    positions = [pos for pos, _, _ in cells]
    if positions != list(range(n_cells)):
        if sorted(positions) != list(range(n_cells)):
            return None  # not positions 0..n-1 (a sliding window dropped some)
        order = sorted(range(n_cells), key=positions.__getitem__)
        view = memoryview(data)
        pieces: list[memoryview] = []
        for seg in segments:
            if seg.kind == "cells":
                at, size = seg.offset, seg.size
                pieces.extend(view[at + i * size : at + (i + 1) * size] for i in order)
            else:
                pieces.append(view[seg.offset : seg.offset + seg.size])
        data = b"".join(pieces)
    return data, tuple(segments)


def _extent(seg: _Segment, cells: int) -> int:
    """How many bytes ``seg`` has in a state of ``cells`` cells."""
    return seg.size * cells if seg.kind == "cells" else seg.size


def _seed(key: str) -> int:
    """The checksums' seed: an entry's key (its salt and tokens), so that a state checks only
    under the entry it was saved for."""
    return int(key[:16], 16)


def _digest(key: str, data: bytes) -> int:
    import xxhash  # here, not at the top: the package imports this module without its extra

    return xxhash.xxh3_64_intdigest(data, seed=_seed(key))


def _layout_sums(
    key: str, segments: Sequence[_Segment], views: Sequence[memoryview], cells: int, chunk: int
) -> list[int]:
    """The checksum of the fixed bytes, then of each chunk of the first ``cells`` cells (one
    view per segment: a ``cells`` segment's view holds at least those cells)."""
    import xxhash

    seed = _seed(key)
    fixed = xxhash.xxh3_64(seed=seed)
    for seg, view in zip(segments, views, strict=True):
        if seg.kind != "cells":
            fixed.update(view)
    sums = [fixed.intdigest()]
    for c in range(-(-cells // chunk)):
        h = xxhash.xxh3_64(_U32.pack(c), seed=seed)
        lo, hi = c * chunk, min((c + 1) * chunk, cells)
        for seg, view in zip(segments, views, strict=True):
            if seg.kind == "cells":
                h.update(view[lo * seg.size : hi * seg.size])
        sums.append(h.intdigest())
    return sums


def _pread(fd: int, n: int, offset: int) -> bytes | None:
    """``n`` bytes at ``offset``; None if the file ends before."""
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            return None
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _parse_layout(raw: object, nbytes: int, n_cells: int) -> _Layout | None:
    """A header's layout, checked to cover the state exactly (ValueError if not)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("layout")
    chunk, segments, sums = raw.get("chunk"), raw.get("segments"), raw.get("sums")
    if not (type(chunk) is int and chunk > 0 and isinstance(segments, list)):
        raise ValueError("layout")
    if not (isinstance(sums, list) and all(type(x) is int for x in sums)):
        raise ValueError("layout")
    parsed, off = [], 0
    for seg in segments:
        if not (isinstance(seg, list) and len(seg) == 3 and all(type(x) is int for x in seg[1:])):
            raise ValueError("layout")
        kind, at, size = seg
        if kind not in ("fixed", "count", "cells") or at != off or size <= 0:
            raise ValueError("layout")
        parsed.append(_Segment(kind, at, size))
        off += _extent(parsed[-1], n_cells)
    if off != nbytes or len(sums) != 1 + -(-n_cells // chunk):
        raise ValueError("layout")
    return _Layout(n_cells, chunk, tuple(parsed), tuple(sums))


class DiskTier:
    """One file per entry: a magic line, the header's length and checksum, a JSON header
    (fingerprint, salt, tokens, the state's size, its checksum and layout), the state's bytes;
    the file is named by the hash of its salt and tokens. Written as a temporary file renamed
    into place (a reader never sees half a file; two processes on one directory each write
    whole files), by a writer thread, which lays the state out and checksums it.
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
        older = 0
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # another process's budget took it
            try:
                head = os.pread(fd, _HEAD_READ, 0)
                if head.startswith(_FAMILY) and not head.startswith(_MAGIC):
                    older += 1  # another version of the format: never read, not corrupt
                    path.unlink(missing_ok=True)
                    continue
                header = self._header(fd, head, path.stem)
                size = os.fstat(fd).st_size
            except OSError:
                header = None
            finally:
                os.close(fd)
            if header is None or size != header.start + header.nbytes:
                self._drop(path)
                continue
            key = path.stem
            self.sizes[key] = size
            self.bytes += size
            self.index.add(key, header.tokens, header.salt)
        if older:
            log.info("KV disk tier: %d entries of another format version deleted", older)
        self._bound()

    def _header(self, fd: int, head: bytes, key: str) -> _Header | None:
        """The header of the file open at ``fd`` (``head``: its first bytes), or None if it is
        not a whole header of this fingerprint, for an entry named ``key`` (the hash of its
        salt and tokens)."""
        try:
            if not head.startswith(_MAGIC):
                return None
            n, digest = _PREFIX.unpack_from(head, len(_MAGIC))
            start = len(_MAGIC) + _PREFIX.size
            raw = head[start : start + n]
            if len(raw) < n:
                more = _pread(fd, n - len(raw), start + len(raw))
                if more is None:
                    return None
                raw += more
            import xxhash

            if xxhash.xxh3_64_intdigest(raw) != digest:
                return None
            header = json.loads(raw)
            if not (isinstance(header, dict) and header.get("fingerprint") == self.fp):
                return None
            tokens, salt = header.get("tokens"), header.get("salt")
            nbytes, state_digest = header.get("nbytes"), header.get("xxh3")
            if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
                return None
            if not (isinstance(salt, str) and type(nbytes) is int and type(state_digest) is int):
                return None
            if _key(tokens, salt) != key:
                return None
            layout = _parse_layout(header.get("layout"), nbytes, len(tokens))
        except (OSError, ValueError, struct.error):
            return None
        return _Header(tuple(tokens), salt, nbytes, state_digest, layout, start + n)

    def _read(self, key: str, n: int | None) -> Saved | None:
        """The entry's state checked (or, given ``n`` and a layout, the state of its first ``n``
        tokens, only their chunks read and checked), or None if the file is gone or is not a
        whole entry of this fingerprint."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except OSError:
            return None
        try:
            header = self._header(fd, os.pread(fd, _HEAD_READ, 0), key)
            if header is None or os.fstat(fd).st_size != header.start + header.nbytes:
                return None
            layout = header.layout
            if n is not None and layout is not None and 0 < n < layout.cells:
                read = -(-n // layout.chunk) * layout.chunk
                # a prefix is read, then copied out (two copies where the whole state takes one
                # read), but it spares the cells (and the entries evicted to make room) the rest
                if read * 3 <= layout.cells * 2:
                    data = _read_prefix(fd, header, layout, key, read, n)
                    return None if data is None else Saved(header.tokens[:n], data, header.salt)
            data = _pread(fd, header.nbytes, header.start)
        except OSError:
            return None
        finally:
            os.close(fd)
        if data is None or _digest(key, data) != header.digest:
            return None
        return Saved(header.tokens, data, header.salt)

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
        with self._lock:
            found = self.index.find(saved.tokens, len(saved.tokens), saved.salt)
        if found is not None and found[1] == len(saved.tokens):
            return  # a longer entry on disk holds it (a prefix read back from it, say)
        data, layout = saved.data, None
        if (laid := _state_layout(data, len(saved.tokens))) is not None:
            data, segments = laid
            view = memoryview(data)
            views = [view[s.offset : s.offset + _extent(s, len(saved.tokens))] for s in segments]
            sums = _layout_sums(key, segments, views, len(saved.tokens), CHUNK)
            layout = {"chunk": CHUNK, "segments": [list(s) for s in segments], "sums": sums}
        header = json.dumps(
            {
                "fingerprint": self.fp,
                "salt": saved.salt,
                "tokens": list(saved.tokens),
                "nbytes": len(data),
                "xxh3": _digest(key, data),
                "layout": layout,
            }
        ).encode()
        import xxhash

        head = _MAGIC + _PREFIX.pack(len(header), xxhash.xxh3_64_intdigest(header)) + header
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            f.write(head)
            f.write(data)
        os.replace(tmp, self._path(key))
        size = len(head) + len(data)
        with self._lock:
            dominated = self.index.dominated(saved.tokens, saved.salt)
            if key not in self.sizes:  # first: its blocks never leave the tier
                self.index.add(key, saved.tokens, saved.salt)
            for old_key in dominated:
                self._forget(old_key)
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

    def announce(self, ledger: BlockLedger) -> None:
        with self._lock:
            self.index.announce(ledger)

    def tokens_of(self, key: str) -> tuple[int, ...]:
        with self._lock:
            return self.index.tokens[key]

    def load(self, key: str, n: int | None = None) -> Saved | None:
        """The entry's state, checked (with ``n``, possibly that of its first ``n`` tokens
        alone: the returned tokens say which); a bad file is deleted, a missing one (another
        process's budget took it) forgotten."""
        read = self._read(key, n)
        path = self._path(key)
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


def _read_prefix(
    fd: int, header: _Header, layout: _Layout, key: str, cells: int, n: int
) -> bytes | None:
    """The state of the first ``n`` cells, from a read of the first ``cells`` (whole chunks)
    of every ``cells`` segment, checked; None if a checksum does not match."""
    ranges = [(s.offset, _extent(s, cells)) for s in layout.segments]
    views: list[memoryview] = []
    i = 0
    while i < len(ranges):  # adjacent runs read at once
        start, end, j = ranges[i][0], sum(ranges[i]), i + 1
        while j < len(ranges) and ranges[j][0] == end:
            end += ranges[j][1]
            j += 1
        data = _pread(fd, end - start, header.start + start)
        if data is None:
            return None
        view = memoryview(data)
        views.extend(view[at - start : at - start + size] for at, size in ranges[i:j])
        i = j
    sums = _layout_sums(key, layout.segments, views, cells, layout.chunk)
    if tuple(sums) != layout.sums[: len(sums)]:
        return None
    pieces: list[bytes | memoryview] = []
    for seg, view in zip(layout.segments, views, strict=True):
        if seg.kind == "count":
            pieces.append(_U32.pack(n))
        else:
            pieces.append(view[: n * seg.size] if seg.kind == "cells" else view)
    return b"".join(pieces)


class KVTiers:
    """The tiers below a model's KV cells; it outlives the engine (an unloaded model's
    prefixes wait in host memory for the reload). The engine thread saves, finds and loads;
    :meth:`prefetch` runs in a worker thread (the lock keeps the host tier whole)."""

    def __init__(self, host: HostTier | None, disk: DiskTier | None) -> None:
        self.host = host
        self.disk = disk
        self.stats = TierStats()
        self._lock = threading.RLock()
        self._announced: tuple[KVEventSink, int] | None = None

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

    def announce(self, sink: KVEventSink, block_size: int) -> None:
        """Publish the blocks each tier holds to ``sink`` (KV events), and every change; again
        only if the sink or the block size changed (the model's config did)."""
        if self._announced == (sink, block_size):
            return
        self._announced = (sink, block_size)
        if self.host is not None:
            with self._lock:
                self.host.index.announce(BlockLedger("CPU", block_size, sink))
        if self.disk is not None:
            self.disk.announce(BlockLedger("DISK", block_size, sink))

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
        memory, not a file read (only its shared prefix, when that is much shorter: then the
        host tier holds that prefix). False if the file was gone or bad."""
        assert self.disk is not None
        started = time.perf_counter()
        saved = self.disk.load(found.key, found.n)
        if saved is None:
            return False
        with self._lock:
            self._keep(saved.key, saved)
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

    def load(self, found: Found) -> Saved | None:
        """The state to restore ``found`` from: the whole entry's, or (a disk entry read in
        part) that of its first ``found.n`` tokens; its tokens say which."""
        with self._lock:
            saved = self.host.get(found.key) if found.tier == "host" and self.host else None
        if saved is None and found.tier == "disk" and self.disk is not None:
            saved = self.disk.load(found.key, found.n)
        with self._lock:
            if saved is None:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            self.stats.restored_tokens += found.n
        return saved

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
