"""Writing a split copy of a GGUF (``<stem>-0000k-of-0000n.gguf``), as llama.cpp's gguf-split does,
with ggml-org's own ``gguf`` package (no llama.cpp build needed)."""

from __future__ import annotations

from pathlib import Path

import gguf


def split_gguf(src: Path, folder: Path, stem: str, max_tensors: int) -> list[Path]:
    """Write ``src`` as shards of at most ``max_tensors`` tensors; return them in order."""
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    folder.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(folder / f"{stem}.gguf"), arch, split_max_tensors=max_tensors)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(folder.glob(f"{stem}-*-of-*.gguf"))
