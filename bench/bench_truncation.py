"""``truncation: "auto"``: how long a long conversation takes to fit the context.

    python bench/bench_truncation.py [--turns 512] [--tools 0] [--words 12]

One in-process gateway on the embedded default model (SmolLM2, llama.cpp). A Responses
request of ``--turns`` user/assistant turns, far past the context, with
``truncation: "auto"`` and ``max_output_tokens: 1``; optionally ``--tools`` distinct tool
schemas (more than 256 once thrashed the schema compile cache on every dropped turn). Prints
the request's wall time and how many input tokens were kept.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import httpx

from gateway.config import parse_config
from gateway.defaults import default_config_dict
from gateway.testing import ServerThread


def conversation(turns: int, words: int) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for i in range(turns):
        out.append({"role": "user", "content": f"question {i} " + "word " * words})
        out.append({"role": "assistant", "content": f"answer {i} " + "reply " * words})
    out.append({"role": "user", "content": "the last question"})
    return out


def tools(n: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "name": f"tool_{i}",
            "parameters": {
                "type": "object",
                "properties": {f"arg_{i}": {"type": "string"}},
                "required": [f"arg_{i}"],
            },
        }
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=512)
    parser.add_argument("--tools", type=int, default=0)
    parser.add_argument("--words", type=int, default=12)
    args = parser.parse_args()
    raw = default_config_dict()
    raw["models"]["smollm2-135m-instruct"].pop("kv_cache", None)
    raw["plugins"] = {}
    body: dict[str, Any] = {
        "model": "default",
        "input": conversation(args.turns, args.words),
        "truncation": "auto",
        "max_output_tokens": 1,
        "store": False,
    }
    if args.tools:
        body["tools"] = tools(args.tools)
    with ServerThread(parse_config(raw, "<bench>")) as srv:
        start = time.perf_counter()
        r = httpx.post(srv.base_url + "/v1/responses/input_tokens", json=body, timeout=600)
        elapsed = time.perf_counter() - start
        print(f"turns={args.turns} tools={args.tools}: {elapsed:.2f} s, {r.status_code} {r.text}")


if __name__ == "__main__":
    main()
