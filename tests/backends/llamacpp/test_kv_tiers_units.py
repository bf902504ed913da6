"""The KV tiers' own logic, without an engine: block-hash lookup, the host tier's budget and
spill to disk, the disk tier's files (checked, bounded, shared by two processes, given up
on a read-only disk), and the slot manager saving and restoring through them."""

from __future__ import annotations

import logging
import os
import random
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from backends.llamacpp.kv_tiers import BLOCK, DiskTier, HostTier, KVTiers, Saved
from backends.llamacpp.slots import SlotManager
from tests.backends.llamacpp.test_units import FakeKV

FP = "f" * 32


def tokens(seed: int, n: int) -> tuple[int, ...]:
    return tuple(seed * 10_000 + i for i in range(n))


def saved(seed: int, n: int = 3 * BLOCK, size: int = 1000) -> Saved:
    return Saved(tokens(seed, n), bytes([seed % 256]) * size)


def test_lookup_finds_the_longest_shared_prefix() -> None:
    tiers = KVTiers(HostTier(1 << 20), None)
    base = tokens(1, 4 * BLOCK)
    tiers.save(Saved(base[: 2 * BLOCK], b"short"))
    tiers.save(Saved(base, b"long"))
    prompt = (*base[: 3 * BLOCK + 5], 99, 98)
    found = tiers.find(prompt, len(prompt) - 1)
    assert found is not None and found.n == 3 * BLOCK + 5
    assert (loaded := tiers.load(found)) is not None and loaded.data == b"long"
    # shorter than one block in common: nothing (a block is the unit of lookup)
    assert tiers.find((*base[: BLOCK - 1], 7, 7), 10_000) is None
    # the limit caps the match (the prompt's last token is always decoded)
    capped = tiers.find(base, 2 * BLOCK)
    assert capped is not None and capped.n == 2 * BLOCK
    assert tiers.find(tokens(2, 3 * BLOCK), 10_000) is None


def test_a_conversation_saved_again_replaces_its_shorter_entry(tmp_path: Path) -> None:
    """The same conversation evicted at turn 3 and again at turn 6: only the longer entry is
    kept, in memory and on disk (the shorter serves no prompt the longer does not)."""
    disk = DiskTier(tmp_path, FP, budget=1 << 20)
    host = HostTier(1 << 20)
    conversation = tokens(4, 6 * BLOCK)
    for n in (2 * BLOCK, 4 * BLOCK):
        host.put(f"k{n}", Saved(conversation[:n], b"x" * n))
        disk.put(Saved(conversation[:n], b"x" * n), wait=True)
    host.put("other", saved(9))
    disk.flush()
    assert list(host.entries) == [f"k{4 * BLOCK}", "other"] and host.bytes == 4 * BLOCK + 1000
    assert len(disk.sizes) == 1 and len(list((tmp_path / FP).glob("*.kv"))) == 1
    disk.close()


def test_the_host_tier_spills_its_oldest_to_disk(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, FP, budget=1 << 20)
    tiers = KVTiers(HostTier(2500), disk)
    for seed in range(4):  # 1000 bytes each: the host keeps two
        tiers.save(saved(seed))
    disk.flush()
    assert tiers.host is not None and len(tiers.host.entries) == 2
    assert {p.name for p in (tmp_path / FP).iterdir()} and len(disk.sizes) == 2
    oldest = tiers.find(tokens(0, 3 * BLOCK), 10_000)
    assert oldest is not None and oldest.tier == "disk"
    assert (loaded := tiers.load(oldest)) is not None and loaded.data == saved(0).data
    newest = tiers.find(tokens(3, 3 * BLOCK), 10_000)
    assert newest is not None and newest.tier == "host"
    tiers.persist()  # unloading: the host's entries are written too
    disk.flush()
    assert len(disk.sizes) == 4
    tiers.close()


def test_prefetch_reads_a_disk_entry_into_host_memory(tmp_path: Path) -> None:
    """After a restart the entry is on disk only; the worker thread's prefetch reads it into
    the host tier, so the engine thread's restore is a copy from memory."""
    first = DiskTier(tmp_path, FP, budget=1 << 20)
    first.put(saved(7), wait=True)
    first.close()
    tiers = KVTiers(HostTier(1 << 20), DiskTier(tmp_path, FP, budget=1 << 20))
    prompt = (*tokens(7, 3 * BLOCK), 1)
    before = tiers.find(prompt, len(prompt) - 1)
    assert before is not None and before.tier == "disk"
    found = tiers.on_disk(prompt)
    assert found is not None and tiers.prefetch(found)
    assert tiers.on_disk(prompt) is None  # in memory now: nothing more to read
    after = tiers.find(prompt, len(prompt) - 1)
    assert after is not None and after.tier == "host" and (loaded := tiers.load(after)) is not None
    assert loaded.data == saved(7).data
    assert tiers.on_disk(tokens(8, 3 * BLOCK)) is None  # nothing saved for it: nothing read
    assert KVTiers(None, tiers.disk).on_disk(prompt) is None  # no host tier: the engine reads
    assert tiers.disk is not None
    tiers.disk._path(found.key).unlink()  # gone since the lookup (another process's budget)
    tiers.host = HostTier(1 << 20)
    assert not tiers.prefetch(found)
    tiers.close()


def test_disk_entries_survive_a_restart_and_stay_in_budget(tmp_path: Path) -> None:
    first = DiskTier(tmp_path, FP, budget=50_000)
    for seed in range(200):  # 200 distinct conversations, ~2.9 KB each on disk
        first.put(saved(seed), wait=True)
    first.close()
    files = list((tmp_path / FP).glob("*.kv"))
    assert sum(f.stat().st_size for f in files) <= 50_000 and len(files) >= 15
    again = DiskTier(tmp_path, FP, budget=50_000)  # a restart: the files are found
    assert len(again.sizes) == len(files)
    found = again.find(tokens(199, 3 * BLOCK), 10_000)
    assert found is not None and found[1] == 3 * BLOCK
    loaded = again.load(found[0])
    assert loaded is not None and loaded.data == saved(199).data
    assert again.find(tokens(0, 3 * BLOCK), 10_000) is None  # the oldest went first
    again.close()


def _entry_file(tmp_path: Path, seed: int) -> Path:
    disk = DiskTier(tmp_path, FP, budget=1 << 20)
    disk.put(saved(seed), wait=True)
    disk.close()
    (path,) = (tmp_path / FP).glob("*.kv")
    return path


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "garbage", "empty"])
def test_a_bad_entry_is_deleted_never_loaded(tmp_path: Path, damage: str) -> None:
    path = _entry_file(tmp_path, 5)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF  # in the state's bytes: only the checksum can tell
    elif damage == "truncate":
        del data[-100:]
    elif damage == "foreign":  # another model's (or K/V type's) entry copied here
        data = data.replace(FP.encode(), b"0" * len(FP))
    elif damage == "garbage":
        data = bytearray(b"not an entry at all")
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    disk = DiskTier(tmp_path, FP, budget=1 << 20)
    found = disk.find(tokens(5, 3 * BLOCK), 10_000)
    if found is not None:  # the header was whole: the bytes are checked at load
        assert disk.load(found[0]) is None
    assert not path.exists() and disk.find(tokens(5, 3 * BLOCK), 10_000) is None
    assert disk.stats.dropped_corrupt == 1
    disk.close()


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    """Each writes whole files under its own temporary names; each finds the other's
    entries on its next start, and a file the other deleted is a miss, not an error."""
    a = DiskTier(tmp_path, FP, budget=1 << 20)
    b = DiskTier(tmp_path, FP, budget=1 << 20)
    for seed in range(20):
        (a if seed % 2 else b).put(saved(seed, size=20_000))
    a.flush()
    b.flush()
    c = DiskTier(tmp_path, FP, budget=1 << 20)
    assert len(c.sizes) == 20
    for seed in range(20):
        found = c.find(tokens(seed, 3 * BLOCK), 10_000)
        assert found is not None
        loaded = c.load(found[0])
        assert loaded is not None and loaded.data == saved(seed, size=20_000).data
    gone = a.find(tokens(1, 3 * BLOCK), 10_000)
    assert gone is not None
    c._path(gone[0]).unlink()  # the other process's budget took it
    assert a.load(gone[0]) is None and a.find(tokens(1, 3 * BLOCK), 10_000) is None
    assert not list((tmp_path / FP).glob(".*.tmp"))
    for tier in (a, b, c):
        tier.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_disk_is_no_disk_tier(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / FP
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        disk = DiskTier(tmp_path, FP, budget=1 << 20)
        with caplog.at_level(logging.ERROR):
            for seed in range(3):
                disk.put(saved(seed), wait=True)
            disk.flush()
        assert disk.broken and len(caplog.records) == 1
        disk.close()
    finally:
        folder.chmod(stat.S_IRWXU)


def test_a_full_disk_is_no_disk_tier(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = DiskTier(tmp_path, FP, budget=1 << 20)
    disk.dir = Path("/dev/full") / "x"  # every write fails as on a full disk
    with caplog.at_level(logging.ERROR):
        for seed in range(3):
            disk.put(saved(seed), wait=True)
        disk.flush()
    assert disk.broken and len(caplog.records) == 1
    tiers = KVTiers(None, disk)
    assert tiers.find(tokens(0, 3 * BLOCK), 10_000) is None
    disk.close()


def _evicted_a() -> tuple[FakeKV, KVTiers, SlotManager, list[int]]:
    """Conversations a, b, c on one live and one cached sequence: a was evicted to the host
    tier."""
    kv = FakeKV()
    tiers = KVTiers(HostTier(1 << 20), None)
    slots = SlotManager(kv, n_live=1, n_cached=1, n_cells=10_000, min_prefix=2, tiers=tiers)
    a = list(tokens(1, 2 * BLOCK))
    for prompt in (a, list(tokens(2, 2 * BLOCK)), list(tokens(3, 2 * BLOCK))):
        p = slots.acquire(prompt)
        slots.extend(p.seq_id, prompt)
        slots.release(p.seq_id, keep=True)
    return kv, tiers, slots, a


def test_slots_save_what_they_evict_and_restore_it() -> None:
    kv, tiers, slots, a = _evicted_a()
    assert ("save", 0) in kv.calls  # a's sequence was evicted: saved first
    kv.calls.clear()
    again = slots.acquire([*a, 5, 6])
    assert again.reused == 2 * BLOCK
    assert kv.calls[-1] == ("load", again.seq_id, b"state of 0")
    assert tiers.stats.hits == 1 and tiers.stats.restored_tokens == 2 * BLOCK


def test_slots_go_on_without_a_state_that_does_not_load() -> None:
    kv, tiers, slots, a = _evicted_a()
    kv.load_ok = False  # e.g. no room left in the context
    again = slots.acquire([*a, 5])
    assert again.reused == 0 and slots.entries[again.seq_id].tokens == []
    assert tiers.stats.misses == 1


@pytest.mark.timeout(10)
def test_disk_entries_are_private(tmp_path: Path) -> None:
    """Issue 23 finding 9: the KV files hold prompts' tokens in plain JSON and were
    world-readable (0644, folders 0755); the folders the tier creates are 0700, its files
    0600."""
    root = tmp_path / "cache" / "kv"
    disk = DiskTier(root, FP, budget=1 << 20)
    disk.put(saved(1), wait=True)
    disk.close()
    for folder in (tmp_path / "cache", root, root / FP):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    (entry,) = (root / FP).glob("*.kv")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600


def test_slots_and_tiers_reuse_a_prefix_only_under_its_salt(tmp_path: Path) -> None:
    """Issue 23 finding 6: the cells and the tiers matched prefixes by tokens alone, for every
    API key; a prefix cached under one salt is no common prefix for another, in the cells,
    the host tier and the disk tier (across a restart: the salt is in the file)."""
    kv = FakeKV()
    tiers = KVTiers(HostTier(1 << 20), None)
    slots = SlotManager(kv, n_live=1, n_cached=1, n_cells=10_000, min_prefix=2, tiers=tiers)
    a = list(tokens(1, 2 * BLOCK))
    p = slots.acquire(a, salt="alice")
    slots.extend(p.seq_id, a)
    slots.release(p.seq_id, keep=True)
    assert slots.acquire([*a, 5], salt="bob").reused == 0  # in the cells: not bob's
    slots.release(1 - p.seq_id, keep=False)
    assert slots.acquire([*a, 5], salt="alice").reused == 2 * BLOCK
    slots.release(p.seq_id, keep=True)
    for other in (2, 3):  # alice's prefix leaves the cells for the host tier
        q = slots.acquire(list(tokens(other, 2 * BLOCK)), salt="alice")
        slots.extend(q.seq_id, tokens(other, 2 * BLOCK))
        slots.release(q.seq_id, keep=True)
    assert tiers.find([*a, 5], 10_000, "bob") is None
    assert tiers.find([*a, 5], 10_000) is None  # nor unsalted
    found = tiers.find([*a, 5], 10_000, "alice")
    assert found is not None and found.n == 2 * BLOCK
    disk = DiskTier(tmp_path, FP, budget=1 << 20)
    disk.put(Saved(tuple(a), b"state", "alice"), wait=True)
    disk.close()
    again = DiskTier(tmp_path, FP, budget=1 << 20)
    assert again.find([*a, 5], 10_000, "bob") is None
    hit = again.find([*a, 5], 10_000, "alice")
    assert hit is not None and (loaded := again.load(hit[0])) is not None
    assert loaded.salt == "alice" and loaded.data == b"state"
    again.close()


@pytest.mark.parametrize("renamed", [False, True])
def test_an_entry_whose_header_tokens_were_changed_is_never_loaded(
    tmp_path: Path, renamed: bool
) -> None:
    """Issue 23 finding 11: the checksum covered the state's bytes, not the header's tokens,
    so an edited file restored a state under tokens it was not computed for; the name (the
    hash of the salt and tokens) and the checksum now cover them."""
    path = _entry_file(tmp_path, 5)
    data = path.read_bytes()
    first = str(tokens(5, 1)[0]).encode()
    forged = data.replace(b"[" + first + b",", b"[" + str(int(first) + 1).encode() + b",", 1)
    assert forged != data and len(forged) == len(data)
    path.write_bytes(forged)
    if renamed:  # named for the forged tokens: only the checksum can tell
        changed = (tokens(5, 1)[0] + 1, *tokens(5, 3 * BLOCK)[1:])
        path = path.rename(path.with_name(Saved(changed, b"").key + ".kv"))
    disk = DiskTier(tmp_path, FP, budget=1 << 20)
    for prompt in (tokens(5, 3 * BLOCK), (tokens(5, 1)[0] + 1, *tokens(5, 3 * BLOCK)[1:])):
        found = disk.find(prompt, 10_000)
        if found is not None:
            assert disk.load(found[0]) is None
    assert not path.exists() and disk.stats.dropped_corrupt == 1
    disk.close()


def llama_state(
    positions: Sequence[int], n_layer: int = 3, row: int = 16, v_trans: int = 0
) -> bytes:
    """A sequence state laid out as llama.cpp's KV cache writes one (flash attention: V rows
    cell by cell): the magic and sequence id, one stream of cells at ``positions`` (in this
    order), each layer's K rows, then its V rows; a cell's bytes depend on its position."""
    out = [struct.pack("<Ii", 0xAF143CD8, 0), struct.pack("<II", 1, len(positions))]
    out += [struct.pack("<iIi", pos, 1, 0) for pos in positions]
    out.append(struct.pack("<II", v_trans, n_layer))
    for layer in range(2 * n_layer):
        out.append(struct.pack("<iQ", 1, row))
        out += [bytes([(layer * 31 + pos) % 256]) * row for pos in positions]
    return b"".join(out)


def _laid_out(tmp_path: Path, n: int = 6 * BLOCK) -> tuple[DiskTier, Saved]:
    """A disk entry whose state's cells were out of position order (cells reused)."""
    positions = list(range(n))
    random.Random(5).shuffle(positions)
    entry = Saved(tokens(6, n), llama_state(positions))
    first = DiskTier(tmp_path, FP, budget=1 << 22)
    first.put(entry, wait=True)
    first.close()
    return DiskTier(tmp_path, FP, budget=1 << 22), entry


def test_a_disk_entry_is_read_only_as_far_as_it_is_restored(tmp_path: Path) -> None:
    """A prompt sharing a short prefix of a long entry reads the chunks of that prefix (its
    cells put in position order when written) and gets the state of those tokens alone; one
    sharing most of it reads the whole state (one read, where a prefix takes two copies)."""
    disk, entry = _laid_out(tmp_path)
    for n in (BLOCK, BLOCK + 5, 2 * BLOCK, 4 * BLOCK):
        part = disk.load(entry.key, n)
        assert part is not None and part.tokens == entry.tokens[:n]
        assert part.data == llama_state(range(n))
    for most in (4 * BLOCK + 1, 6 * BLOCK - 1, 6 * BLOCK, None):
        whole = disk.load(entry.key, most)
        assert whole is not None and whole.tokens == entry.tokens
        assert whole.data == llama_state(range(6 * BLOCK))
    assert disk.stats.dropped_corrupt == 0
    disk.close()


@pytest.mark.parametrize(
    ("chunk", "n", "ok"), [(1, 2 * BLOCK - 3, False), (5, 2 * BLOCK - 3, True), (5, None, False)]
)
def test_a_prefix_read_checks_what_it_reads(
    tmp_path: Path, chunk: int, n: int | None, ok: bool
) -> None:
    """A byte flipped in the cells of one chunk: a read of the first two chunks finds it in
    chunk 1 (a miss, the file deleted); in chunk 5, which it does not read (nor restore), a
    whole read finds it."""
    disk, entry = _laid_out(tmp_path)
    path = disk._path(entry.key)
    data = bytearray(path.read_bytes())
    data[-(6 - chunk) * BLOCK * 16 + 3] ^= 0xFF  # the last layer's V rows: 16 bytes per cell
    path.write_bytes(bytes(data))
    loaded = disk.load(entry.key, n)
    assert (loaded is not None) is ok and path.exists() is ok
    assert disk.stats.dropped_corrupt == (0 if ok else 1)
    disk.close()


def test_a_state_not_laid_out_for_prefixes_is_read_whole(tmp_path: Path) -> None:
    """V transposed (no flash attention), bytes after the cells (another cache's state),
    positions not 0..n-1: the state is kept as it is and restored whole."""
    n = 4 * BLOCK
    plain = llama_state(range(n))
    transposed = llama_state(range(n), v_trans=1)
    shifted = llama_state(range(1, n + 1))
    disk = DiskTier(tmp_path, FP, budget=1 << 22)
    for seed, state in enumerate((transposed, plain + b"more", shifted)):
        disk.put(Saved(tokens(seed, n), state), wait=True)
    disk.flush()
    for seed, state in enumerate((transposed, plain + b"more", shifted)):
        loaded = disk.load(Saved(tokens(seed, n), b"").key, BLOCK)
        assert loaded is not None and loaded.data == state and len(loaded.tokens) == n
    disk.close()


def test_a_prefetched_prefix_is_not_written_back(tmp_path: Path) -> None:
    """After a restart a prompt sharing a short prefix of an entry has that prefix read into
    host memory, and restored from there; when the host tier lets it go, the disk's longer
    entry holds it already: nothing is written."""
    disk, entry = _laid_out(tmp_path)
    tiers = KVTiers(HostTier(1 << 22), disk)
    prompt = (*entry.tokens[: 2 * BLOCK], 1, 2)
    found = tiers.on_disk(prompt)
    assert found is not None and tiers.prefetch(found)
    assert tiers.host is not None
    assert [e.tokens for e in tiers.host.entries.values()] == [prompt[:-2]]
    kv = FakeKV()
    slots = SlotManager(kv, n_live=1, n_cached=1, n_cells=10_000, tiers=tiers)
    assert slots.acquire(prompt).reused == 2 * BLOCK
    assert kv.calls[-1] == ("load", 0, llama_state(range(2 * BLOCK)))
    tiers.host.budget = 0
    tiers.save(saved(9))  # the host tier spills everything
    tiers.flush()
    assert set(disk.sizes) == {entry.key, saved(9).key}
    tiers.close()


def test_the_engine_restores_a_prefix_read_from_disk(tmp_path: Path) -> None:
    """Without a host tier the engine thread reads the entry itself: only the prefix, and
    it makes room for that prefix's cells, not the entry's."""
    disk, entry = _laid_out(tmp_path)
    kv = FakeKV()
    slots = SlotManager(kv, n_live=1, n_cached=1, n_cells=3 * BLOCK, tiers=KVTiers(None, disk))
    placed = slots.acquire([*entry.tokens[: 2 * BLOCK + 3], 1])
    assert placed.reused == 2 * BLOCK + 3
    assert kv.calls[-1] == ("load", 0, llama_state(range(2 * BLOCK + 3)))
    assert slots.entries[0].tokens == list(entry.tokens[: 2 * BLOCK + 3])
    disk.close()


def test_an_entry_of_an_earlier_format_is_deleted_not_counted_corrupt(tmp_path: Path) -> None:
    folder = tmp_path / FP
    folder.mkdir()
    old = folder / (saved(1).key + ".kv")
    old.write_bytes(b'GWKV2\n\x05\x00\x00\x00{"a"}' + b"x" * 100)
    disk = DiskTier(tmp_path, FP, budget=1 << 20)
    assert not old.exists() and not disk.sizes and disk.stats.dropped_corrupt == 0
    disk.close()
