"""Pure logic of the backend: config validation, GGUF checks, detokenization, slot placement."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest

from backends.llamacpp.config import LlamaCppConfig
from backends.llamacpp.detokenize import Detokenizer
from backends.llamacpp.gguf_file import ModelFileError, check_model_file
from backends.llamacpp.model import LlamaMemory
from backends.llamacpp.slots import SlotManager
from gateway.config import parse_config
from gateway.errors import ConfigError


def _config(**table: object) -> LlamaCppConfig:
    cfg = parse_config(
        {"models": {"m": {"backend": "llamacpp", "model_path": "/x.gguf", **table}}}, "<t>"
    ).models["m"]
    assert isinstance(cfg, LlamaCppConfig)
    return cfg


def test_config_defaults() -> None:
    cfg = _config()
    assert cfg.n_gpu_layers == -1
    assert 1 <= cfg.batching.n_threads <= 4
    assert cfg.n_ctx_total == cfg.kv_cache.n_ctx_per_slot * cfg.batching.max_concurrent
    assert cfg.n_threads_batch == cfg.batching.n_threads
    assert cfg.kv_cache.layout == "per_sequence"
    assert cfg.n_seq == cfg.batching.max_concurrent  # the idle slots hold the cached prefixes
    pool = _config(kv_cache={"layout": "unified"})
    assert pool.n_seq == pool.batching.max_concurrent + 8
    assert pool.n_ctx_total == cfg.n_ctx_total


def test_a_stream_per_sequence_sizes_the_cells_per_sequence() -> None:
    cfg = _config(kv_cache={"layout": "per_sequence", "n_ctx_per_slot": 1000})
    assert cfg.n_seq == cfg.batching.max_concurrent
    assert cfg.n_ctx_total == 1000 * cfg.n_seq
    more = _config(kv_cache={"layout": "per_sequence", "cached_prefixes": 2})
    assert more.n_seq == more.batching.max_concurrent + 2
    assert more.n_ctx_total == more.kv_cache.n_ctx_per_slot * more.n_seq
    off = _config(kv_cache={"layout": "unified", "prefix_reuse": False, "cached_prefixes": 3})
    assert off.n_seq == off.batching.max_concurrent


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"kv_cache": {"type_k": "q5_1"}}, "models.m.kv_cache.type_k"),
        ({"kv_cache": {"type_v": "q8_0"}, "flash_attn": "off"}, "kv_cache.type_v"),
        ({"kv_cache": {"n_ctx": 1000}}, "kv_cache.n_ctx"),
        ({"kv_cache": {"n_ctx": 1 << 16, "layout": "per_sequence"}}, "kv_cache.n_ctx"),
        ({"kv_cache": {"layout": "paged"}}, "models.m.kv_cache.layout"),
        ({"batching": {"prefill_chunk_tokens": 0}}, "models.m.batching.prefill_chunk_tokens"),
        ({"batching": {"n_thread": 2}}, "models.m.batching.n_thread"),
        ({"tensor_split": [-1.0]}, "tensor_split"),
        ({"n_gpu_layers": -2}, "models.m.n_gpu_layers"),
        (
            {
                "batching": {"max_concurrent": 250},
                "kv_cache": {"n_ctx_per_slot": 16, "cached_prefixes": 8},
            },
            "cached_prefixes",
        ),
    ],
)
def test_config_errors_name_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(**table)
    assert key in str(info.value)


def test_gguf_checks_name_the_file(tmp_path: Path, tiny_path: Path) -> None:
    check_model_file(tiny_path)
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelFileError, match=f"{missing} does not exist"):
        check_model_file(missing)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelFileError, match=f"{not_gguf} is not a GGUF file"):
        check_model_file(not_gguf)
    data = tiny_path.read_bytes()
    for cut in (len(data) - 100, 1000, 10):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=f"{truncated} is truncated"):
            check_model_file(truncated)


def test_detokenizer_holds_split_characters() -> None:
    d = Detokenizer()
    emoji = "😀".encode()
    assert d.feed(b"a" + emoji[:1]) == "a"
    assert d.feed(emoji[1:3]) == ""
    assert d.feed(emoji[3:] + "中".encode()[:2]) == "😀"
    assert d.flush() == ""  # an unfinished character at the end is dropped, not broken
    assert d.feed(b"\xff ok") == "\ufffd ok"  # never-valid bytes: replacement character


class FakeKV:
    """Records the memory calls the slot manager makes (its own logic is what is tested)."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.load_ok = True
        self.copy_ok = True

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        self.calls.append(("rm", seq_id, p0, p1))
        return True

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        self.calls.append(("cp", src, dst, 0, n))
        return self.copy_ok

    def seq_pos_min(self, seq_id: int) -> int:
        return 0

    def save(self, seq_id: int) -> bytes:
        self.calls.append(("save", seq_id))
        return f"state of {seq_id}".encode()

    def load(self, seq_id: int, data: bytes) -> bool:
        self.calls.append(("load", seq_id, data))
        return self.load_ok


def _manager(kv: FakeKV, n_live: int = 1, n_cached: int = 2, cells: int = 100) -> SlotManager:
    return SlotManager(kv, n_live=n_live, n_cached=n_cached, n_cells=cells, min_prefix=2)


def test_slots_continue_a_conversation_in_place() -> None:
    kv = FakeKV()
    slots = _manager(kv)
    a = slots.acquire([1, 2, 3, 4])
    assert a.reused == 0
    slots.extend(a.seq_id, [1, 2, 3, 4, 9])
    slots.release(a.seq_id, keep=True)
    again = slots.acquire([1, 2, 3, 4, 9, 7, 8])
    assert (again.seq_id, again.reused) == (a.seq_id, 5)
    assert kv.calls == []  # nothing removed, nothing copied


def test_slots_users_a_b_a_with_one_live_slot() -> None:
    kv = FakeKV()
    slots = _manager(kv)
    placements = {}
    for user, prompt in (("a", [1, 2, 3, 4]), ("b", [5, 6, 7]), ("a2", [1, 2, 3, 4, 8, 9])):
        p = slots.acquire(prompt)
        placements[user] = p
        slots.extend(p.seq_id, prompt[p.reused :])
        slots.release(p.seq_id, keep=True)
    assert placements["b"].seq_id != placements["a"].seq_id
    assert placements["a2"] == type(placements["a2"])(placements["a"].seq_id, 4)


@pytest.mark.parametrize("copied", [True, False])
def test_slots_partial_match_copies_and_keeps_the_source(copied: bool) -> None:
    kv = FakeKV()
    slots = _manager(kv)
    a = slots.acquire([1, 2, 3, 4, 5])
    slots.extend(a.seq_id, [1, 2, 3, 4, 5])
    slots.release(a.seq_id, keep=True)
    kv.copy_ok = copied  # a failed copy (e.g. a stream too small for the state): read whole
    b = slots.acquire([1, 2, 3, 9])
    assert b.seq_id != a.seq_id and b.reused == (3 if copied else 0)
    assert kv.calls == [("cp", a.seq_id, b.seq_id, 0, 3)]
    assert slots.entries[b.seq_id].tokens == ([1, 2, 3] if copied else [])
    assert slots.entries[a.seq_id].tokens == [1, 2, 3, 4, 5]


class FakeLlamaMemory:
    """llama.cpp's memory calls over cell counts per sequence (a state is that many bytes)."""

    def __init__(self, *, drops_tails: bool = True) -> None:
        self.cells = {0: 5, 1: 0}
        self.drops_tails = drops_tails
        self.shared: list[tuple[int, int, int, int]] = []

    def llama_get_memory(self, ctx: object) -> str:
        return "memory"

    def llama_memory_seq_rm(self, mem: str, seq: int, p0: int, p1: int) -> bool:
        if p0 > 0 and not self.drops_tails:
            return False  # a recurrent model's memory
        self.cells[seq] = min(self.cells[seq], max(p0, 0))
        return True

    def llama_memory_seq_cp(self, mem: str, src: int, dst: int, p0: int, p1: int) -> None:
        self.shared.append((src, dst, p0, p1))

    def llama_state_seq_get_size_ext(self, ctx: object, seq: int, flags: int) -> int:
        return self.cells[seq]

    def llama_state_seq_get_data_ext(
        self, ctx: object, buf: Any, size: int, seq: int, flags: int
    ) -> int:
        return size

    def llama_state_seq_set_data_ext(
        self, ctx: object, src: object, n: int, seq: int, flags: int
    ) -> int:
        self.cells[seq] = n
        return n


def test_a_prefix_is_copied_across_streams_and_shared_in_one_pool() -> None:
    llama = FakeLlamaMemory()
    streams = LlamaMemory(cast(ModuleType, llama), None, streams=True)
    assert streams.copy_prefix(0, 1, 3)
    assert llama.cells == {0: 5, 1: 3} and llama.shared == []  # the state copied, then cut
    recurrent = FakeLlamaMemory(drops_tails=False)
    memory = LlamaMemory(cast(ModuleType, recurrent), None, streams=True)
    assert not memory.copy_prefix(0, 1, 3)
    assert recurrent.cells == {0: 5, 1: 0}  # nothing left behind in the target
    pool = FakeLlamaMemory()
    assert LlamaMemory(cast(ModuleType, pool), None).copy_prefix(0, 1, 3)
    assert pool.shared == [(0, 1, 0, 3)] and pool.cells[1] == 0  # shared cells, no copy


def test_slots_reuse_leaves_one_prompt_token_to_decode() -> None:
    slots = _manager(FakeKV())
    a = slots.acquire([1, 2, 3])
    slots.extend(a.seq_id, [1, 2, 3])
    slots.release(a.seq_id, keep=True)
    assert slots.acquire([1, 2, 3]).reused == 2


def test_slots_evict_lru_for_room_and_drop_cancelled() -> None:
    kv = FakeKV()
    slots = _manager(kv, n_live=2, n_cached=1, cells=10)
    old = slots.acquire([1, 2, 3, 4])
    slots.extend(old.seq_id, [1, 2, 3, 4])
    slots.release(old.seq_id, keep=True)
    live = slots.acquire([7, 8])
    slots.extend(live.seq_id, [7, 8])
    assert slots.cells_used == 6
    assert slots.make_room(5)
    assert ("rm", old.seq_id, -1, -1) in kv.calls
    assert slots.cells_used == 2
    slots.release(live.seq_id, keep=False)
    assert slots.cells_used == 0 and slots.live == 0
    assert not slots.make_room(11)
