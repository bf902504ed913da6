"""Make a CUDA torch wheel (2.11.0+cu130) importable without a GPU and without its nvidia-* wheels.

Only so that ``torch.utils.cpp_extension`` can drive an extension build there: for each CUDA
library that torch's own libraries link and the local toolkit copy lacks, write an empty-bodied
stand-in ``.so`` with the right SONAME, symbol-version node and symbols. Nothing ever runs them.

usage: python make_torch_stubs.py TORCH_LIB_DIR OUT_DIR
then:  LD_LIBRARY_PATH=OUT_DIR:<toolkit>/lib python -c 'import torch'
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

# SONAME -> version node its symbols carry in torch's undefined-symbol table (None: unversioned)
STUBS: dict[str, str | None] = {
    "libcudnn.so.9": "libcudnn.so.9",
    "libcufft.so.12": "libcufft.so.12",
    "libcusolver.so.12": "libcusolver.so.12",
    "libcusparse.so.12": "libcusparse.so.12",
    "libnvrtc.so.13": "libnvrtc.so.13",
    "libnvshmem_host.so.3": "NVSHMEM",
    "libcupti.so.13": "libcupti.so.13",
    "libcufile.so.0": None,
    "libcurand.so.10": None,
    "libcusparseLt.so.0": None,
    "libnccl.so.2": None,
    "libcuda.so.1": None,
}
# unversioned symbols are assigned to a stub by name prefix
PREFIXES: dict[str, str] = {
    "libnccl.so.2": r"^nccl",
    "libcufile.so.0": r"^cuFile",
    "libcurand.so.10": r"^curand",
    "libcusparseLt.so.0": r"^cusparseLt",
    "libcuda.so.1": r"^cu[A-Z]",
    "libnvshmem_host.so.3": r"^nvshmem",
}
NOT_DRIVER = re.compile(r"^cu(File|rand|sparse|solver|fft|dnn|DNN)")


def undefined_symbols(libs: list[str]) -> tuple[dict[str, set[str]], set[str]]:
    """(versioned symbols by version node, unversioned symbols) that ``libs`` import."""
    out = subprocess.run(
        ["nm", "-D", "--undefined-only", *libs], capture_output=True, text=True
    ).stdout
    versioned: dict[str, set[str]] = collections.defaultdict(set)
    unversioned: set[str] = set()
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        sym = parts[-1]
        if "@" in sym:
            name, node = re.split("@+", sym, maxsplit=1)
            versioned[node].add(name)
        else:
            unversioned.add(sym)
    return versioned, unversioned


def stub_symbols(so: str, versioned: dict[str, set[str]], unversioned: set[str]) -> set[str]:
    node = STUBS[so]
    syms = set(versioned.get(node, ())) if node else set()
    prefix = PREFIXES.get(so)
    if prefix:
        syms |= {
            s
            for s in unversioned
            if re.match(prefix, s) and not (so == "libcuda.so.1" and NOT_DRIVER.match(s))
        }
    return syms


def build_stub(out: str, so: str, syms: set[str]) -> None:
    src = os.path.join(out, so + ".c")
    with open(src, "w") as f:
        f.write("void __stub_dummy(void){}\n")
        f.writelines(f"void {s}(void){{}}\n" for s in sorted(syms))
    cmd = [
        "gcc",
        "-shared",
        "-fPIC",
        "-w",
        "-fno-builtin",
        f"-Wl,-soname,{so}",
        "-o",
        os.path.join(out, so),
    ]
    node = STUBS[so]
    if node:
        vmap = os.path.join(out, so + ".map")
        with open(vmap, "w") as f:
            f.write(node + " { global: *; };\n")
        cmd.append(f"-Wl,--version-script={vmap}")
    subprocess.check_call([*cmd, src])


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    torch_lib, out = argv[1], argv[2]
    os.makedirs(out, exist_ok=True)
    libs = [os.path.join(torch_lib, f) for f in sorted(os.listdir(torch_lib)) if f.endswith(".so")]
    versioned, unversioned = undefined_symbols(libs)
    for so in STUBS:
        syms = stub_symbols(so, versioned, unversioned)
        build_stub(out, so, syms)
        print(so, len(syms))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
