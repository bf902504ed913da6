"""The serving benchmark (bench_serving.py, unchanged) once per backend whose model is given.

    GATEWAY_TEST_GGUF_MODEL=... GATEWAY_TEST_EXL2_MODEL=... python bench/bench_backends.py

Models come from the variables the GPU check sets: GATEWAY_TEST_GGUF_MODEL (llama.cpp),
GATEWAY_TEST_EXL2_MODEL or else GATEWAY_TEST_HF_MODEL (ExLlamaV2), GATEWAY_TEST_EXL3_MODEL
(ExLlamaV3). Each runs at 1 and 8 concurrent streams plus a short multi-turn conversation;
results go to GATEWAY_BENCH_OUT (default: the current folder) as JSON and one markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving


def backend_tables() -> dict[str, dict[str, object]]:
    """One model table per backend whose model is set in the environment."""
    batching = {"max_concurrent": 8, "max_queue": 256, "queue_timeout_s": 600}
    tables: dict[str, dict[str, object]] = {}
    gguf = os.environ.get("GATEWAY_TEST_GGUF_MODEL")
    if gguf:
        tables["llamacpp"] = {
            "backend": "llamacpp",
            "model_path": gguf,
            "n_gpu_layers": -1,
            "batching": batching,
            "kv_cache": {"n_ctx_per_slot": 1024},
        }
    exl2 = os.environ.get("GATEWAY_TEST_EXL2_MODEL") or os.environ.get("GATEWAY_TEST_HF_MODEL")
    if exl2:
        tables["exllamav2"] = {
            "backend": "exllamav2",
            "model_dir": exl2,
            "batching": batching,
            "kv_cache": {"max_seq_len": 1024, "size_tokens": 8192},
        }
    exl3 = os.environ.get("GATEWAY_TEST_EXL3_MODEL")
    if exl3:
        tables["exllamav3"] = {
            "backend": "exllamav3",
            "model_dir": exl3,
            "batching": batching,
            "kv_cache": {"max_seq_len": 1024, "size_tokens": 8192},
        }
    return tables


def peer_installed() -> bool:
    """llama-cpp-python's own server (the llama.cpp peer) needs its ``server`` extra."""
    needed = ("fastapi", "pydantic_settings", "starlette_context", "llama_cpp")
    return all(importlib.util.find_spec(m) is not None for m in needed)


def summary(name: str, path: Path) -> str:
    results = json.loads(path.read_text())["results"]
    rows = [
        f"| {name} | {server} | {r['streams']} | {r['tokens_per_s']:.1f} | "
        f"{r['ttft_p50_s'] * 1e3:.0f} | {r['ttft_p95_s'] * 1e3:.0f} |"
        for server, data in results.items()
        for r in data["load"]
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    out = Path(os.environ.get("GATEWAY_BENCH_OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| backend | server | streams | tok/s | TTFT p50 ms | TTFT p95 ms |",
        "|---|---|---|---|---|---|",
    ]
    failed = 0
    for name, table in backend_tables().items():
        config = out / f"{name}.toml"
        config.write_text(bench_serving._toml({"models": {f"bench-{name}": table}}))
        result = out / f"bench_{name}.json"
        argv = ["--backend-config", str(config), "--json", str(result)]
        if name != "llamacpp" or not peer_installed():
            argv.append("--skip-peer")
        argv += ["--plot", str(out / f"bench_{name}.png"), "--max-tokens", str(args.max_tokens)]
        argv += ["--concurrency", *map(str, args.concurrency), "--users", "2", "--turns", "3"]
        argv += ["--no-ban-eos"] if name != "llamacpp" else []
        if name == "llamacpp":
            argv += ["--gguf", str(table["model_path"])]
        print(f"=== {name}", flush=True)
        try:
            bench_serving.main(argv)
            lines.append(summary(name, result))
        except Exception as err:  # one backend failing must not hide the others' numbers
            failed += 1
            lines.append(f"| {name} | failed: {type(err).__name__}: {err} | | | | |")
    (out / "bench_backends.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
