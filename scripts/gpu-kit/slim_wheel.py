"""Keep one copy of each shared library in a locally built llama-cpp-python wheel.

Wheels cannot hold symbolic links, so scikit-build-core stores every library six times
(top-level ``lib/`` and ``llama_cpp/lib/``, three names each): a CUDA sm_90 build comes out at
~149 MB. This keeps ``llama_cpp/lib/`` with the names ctypes loads (``libllama.so``,
``libggml.so``, ``libmtmd.so``) and the SONAME files the dynamic loader follows from them,
rewrites RECORD, and recompresses (~26 MB).

usage: python slim_wheel.py IN.whl OUT.whl
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

LIB_DIR = "llama_cpp/lib/"
LOADED_BY_CTYPES = frozenset({"libllama.so", "libggml.so", "libmtmd.so"})


def needed_sonames(data: bytes) -> set[str]:
    """The DT_NEEDED entries of an ELF shared library (via readelf)."""
    with tempfile.NamedTemporaryFile(suffix=".so") as tmp:
        tmp.write(data)
        tmp.flush()
        out = subprocess.run(
            ["readelf", "-d", tmp.name], capture_output=True, text=True, check=True
        ).stdout
    return {
        line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line
    }


def libs_to_keep(zin: zipfile.ZipFile) -> set[str]:
    """Names under llama_cpp/lib/ reachable from the ctypes entry points through DT_NEEDED."""
    present = {
        os.path.basename(n): n for n in zin.namelist() if n.startswith(LIB_DIR) and ".so" in n
    }
    keep: set[str] = set()
    todo = [name for name in LOADED_BY_CTYPES if name in present]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo.extend(dep for dep in needed_sonames(zin.read(present[name])) if dep in present)
    return keep


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(src: str, dst: str) -> int:
    """Write the slimmed wheel; returns its size in bytes."""
    with zipfile.ZipFile(src) as zin:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        keep = libs_to_keep(zin)
        lines: list[str] = []
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in zin.infolist():
                name = info.filename
                dropped_lib = name.startswith(LIB_DIR) and os.path.basename(name) not in keep
                if name == record or name.startswith("lib/") or dropped_lib:
                    continue
                data = zin.read(name)
                out = zipfile.ZipInfo(name, date_time=info.date_time)
                out.external_attr = info.external_attr
                out.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(out, data)
                lines.append(record_line(name, data))
            zout.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    print("kept", sorted(keep), file=sys.stderr)
    return os.path.getsize(dst)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    print(argv[2], slim(argv[1], argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
