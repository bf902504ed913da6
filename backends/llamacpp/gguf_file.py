"""Checks a model file before llama.cpp sees it: exists, is GGUF, is not truncated.

llama.cpp reports these as a NULL model and a line in its own log; this module reads the GGUF
header (pure Python, no numpy) so ``start()`` can say which file is wrong and how.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format of a scalar (8 = string, 9 = array).
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9

# ggml tensor types -> (elements per block, bytes per block), for the common ones.
_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),
    28: (1, 8), 30: (1, 2),
}  # fmt: skip


class ModelFileError(Exception):
    """The model file is missing or unusable; the message names the file."""


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f = f
        self.path = path

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ModelFileError(
                f"model file {self.path} is truncated (its GGUF header is cut off)"
            )
        return data

    def unpack(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]
        return value

    def uint(self, fmt: str = "<Q") -> int:
        return int(self.unpack(fmt))

    def string(self) -> str:
        n = self.uint()
        if n > 1 << 30:
            raise ModelFileError(f"model file {self.path} has a corrupt GGUF header")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.uint("<I"), self.uint()
            if item_type in _SCALARS:  # skip numbers without decoding them
                self.read(struct.calcsize(_SCALARS[item_type]) * count)
            else:
                for _ in range(count):
                    self.value(item_type)
            return None
        raise ModelFileError(f"model file {self.path} has a corrupt GGUF header (type {vtype})")


def _tensor_bytes(ggml_type: int, dims: list[int]) -> int | None:
    block = _BLOCKS.get(ggml_type)
    if block is None:
        return None
    n = 1
    for d in dims:
        n *= d
    per_block, size = block
    return (n + per_block - 1) // per_block * size


def check_model_file(path: Path) -> None:
    """Raise :class:`ModelFileError` unless ``path`` is a complete GGUF file."""
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelFileError(f"model file {path} is not a regular file")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            _check(_Reader(f, path), size)
    except OSError as err:
        raise ModelFileError(f"model file {path} cannot be read: {err.strerror}") from err


def _check(r: _Reader, size: int) -> None:
    path = r.path
    magic = r.f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"model file {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
        )
    version = r.uint("<I")
    if version not in (2, 3):
        raise ModelFileError(f"model file {path} has unsupported GGUF version {version}")
    n_tensors, n_kv = r.uint(), r.uint()
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, vtype = r.string(), r.uint("<I")
        value = r.value(vtype)
        if key == "general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    end = 0
    for _ in range(n_tensors):
        r.string()
        dims = [r.uint() for _ in range(r.uint("<I"))]
        ggml_type, offset = r.uint("<I"), r.uint()
        nbytes = _tensor_bytes(ggml_type, dims)
        end = max(end, offset + (nbytes or 0))
    data_start = -(-r.f.tell() // alignment) * alignment
    if data_start + end > size:
        raise ModelFileError(
            f"model file {path} is truncated: its tensors need {data_start + end} bytes, "
            f"the file has {size}"
        )
