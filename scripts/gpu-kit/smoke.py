"""Engine-level GPU smoke checks, independent of the gateway's code (run by scripts/gpu-check.sh).

    python smoke.py llama MODEL.gguf OUT.json  llama-cpp-python: GPU offload, greedy + streamed text
    python smoke.py exl2 MODEL_DIR OUT.json    exllamav2: load (fp16 HF or EXL2), generator, cancel
    python smoke.py exl3 MODEL_DIR OUT.json    exllamav3: load an EXL3 model, generator, stream

Each writes a JSON result ({"ok": bool, ...}) and exits 0 when ok. Greedy text is generated twice
to show it is deterministic; streamed chunks should concatenate to the non-streamed text.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

Result = dict[str, Any]
PROMPT = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"


def timed(result: Result, key: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    value = fn()
    result[f"{key}_s"] = round(time.perf_counter() - t, 3)
    return value


def check_llama(path: str) -> Result:
    import llama_cpp

    r: Result = {
        "version": llama_cpp.__version__,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    }
    llm = timed(
        r,
        "load",
        lambda: llama_cpp.Llama(model_path=path, n_gpu_layers=-1, n_ctx=1024, seed=1, verbose=True),
    )
    greedy = timed(
        r, "greedy", lambda: llm.create_completion(PROMPT, max_tokens=32, temperature=0.0)
    )
    text = greedy["choices"][0]["text"]
    chunks = [
        c["choices"][0]["text"]
        for c in llm.create_completion(PROMPT, max_tokens=32, temperature=0.0, stream=True)
    ]
    t = time.perf_counter()
    n = llm.create_completion(PROMPT, max_tokens=256, temperature=0.0)["usage"]["completion_tokens"]
    r["decode_tok_s"] = round(n / (time.perf_counter() - t), 1)
    r.update(
        text=text,
        usage=greedy["usage"],
        stream_matches=("".join(chunks) == text),
        chunks=len(chunks),
    )
    r["ok"] = r["gpu_offload"] and r["stream_matches"] and bool(text)
    return r


def check_exl2(model_dir: str) -> Result:
    import exllamav2
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.attn import has_flash_attn_with_paged
    from exllamav2.ext import exllamav2_ext
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    paged = bool(has_flash_attn_with_paged)
    r: Result = {
        "version": exllamav2.__version__,
        "ext": getattr(exllamav2_ext, "__file__", "?"),
        "paged": paged,
    }
    cfg = ExLlamaV2Config(model_dir)
    cfg.max_seq_len = 2048
    cfg.no_flash_attn = not paged
    model = ExLlamaV2(cfg)
    cache = ExLlamaV2Cache(model, max_seq_len=2048, lazy=True)
    timed(r, "load", lambda: model.load_autosplit(cache, progress=False))
    tok = ExLlamaV2Tokenizer(cfg)
    gen = ExLlamaV2DynamicGenerator(
        model=model, cache=cache, tokenizer=tok, paged=paged, max_batch_size=8 if paged else 1
    )
    greedy = ExLlamaV2Sampler.Settings.greedy()

    def stream(max_new: int, cancel_after: int | None = None) -> tuple[str, int]:
        job = ExLlamaV2DynamicJob(
            input_ids=tok.encode(PROMPT, encode_special_tokens=True),
            max_new_tokens=max_new,
            gen_settings=greedy,
        )
        gen.enqueue(job)
        text, n = "", 0
        while gen.num_remaining_jobs():
            for res in gen.iterate():
                if res["stage"] == "streaming":
                    text += res.get("text", "")
                    n += 1
            if cancel_after is not None and n >= cancel_after and gen.num_remaining_jobs():
                gen.cancel(job)
        return text, n

    full = gen.generate(
        prompt=PROMPT,
        max_new_tokens=32,
        gen_settings=greedy,
        encode_special_tokens=True,
        completion_only=True,
    )
    streamed, _ = timed(r, "stream", lambda: stream(32))
    _, before_cancel = stream(500, cancel_after=5)
    t = time.perf_counter()
    stream(256)
    r["decode_tok_s"] = round(256 / (time.perf_counter() - t), 1)
    r.update(
        text=full,
        deterministic=(
            full
            == gen.generate(
                prompt=PROMPT,
                max_new_tokens=32,
                gen_settings=greedy,
                encode_special_tokens=True,
                completion_only=True,
            )
        ),
        stream_matches=(streamed == full),
        chunks_before_cancel=before_cancel,
        jobs_after_cancel=gen.num_remaining_jobs(),
    )
    r["ok"] = bool(full) and r["deterministic"] and r["jobs_after_cancel"] == 0
    return r


def check_exl3(model_dir: str) -> Result:
    import exllamav3
    from exllamav3 import Cache, Config, Generator, Job, Model, Tokenizer
    from exllamav3.generator.sampler import ArgmaxSampler

    r: Result = {"version": getattr(exllamav3, "__version__", "?")}
    cfg = Config.from_directory(model_dir)
    model = Model.from_config(cfg)
    cache = Cache(model, max_num_tokens=4096)
    timed(r, "load", lambda: model.load(progressbar=False))
    tok = Tokenizer.from_config(cfg)
    gen = Generator(model=model, cache=cache, tokenizer=tok)
    full = gen.generate(
        prompt=PROMPT,
        max_new_tokens=32,
        sampler=ArgmaxSampler(),
        encode_special_tokens=True,
        completion_only=True,
    )
    job = Job(
        input_ids=tok.encode(PROMPT, encode_special_tokens=True),
        max_new_tokens=32,
        sampler=ArgmaxSampler(),
    )
    gen.enqueue(job)
    streamed = ""
    while gen.num_remaining_jobs():
        for res in gen.iterate():
            if res["stage"] == "streaming":
                streamed += res.get("text", "")
    r.update(text=full, stream_matches=(streamed == full))
    r["ok"] = bool(full)
    return r


CHECKS: dict[str, Callable[[str], Result]] = {
    "llama": check_llama,
    "exl2": check_exl2,
    "exl3": check_exl3,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in CHECKS:
        print(__doc__, file=sys.stderr)
        return 2
    kind, model, out = argv
    t = time.perf_counter()
    try:
        result = CHECKS[kind](model)
    except Exception as e:  # a smoke check reports every failure as data
        result = {"ok": False, "error": repr(e)[:2000], "traceback": traceback.format_exc()[-4000:]}
    result["total_s"] = round(time.perf_counter() - t, 2)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(json.dumps(result, default=str)[:3000])
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
