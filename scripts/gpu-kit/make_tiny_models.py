"""Create tiny random-weight Llama test models offline: an HF checkpoint (fp16) and a GGUF of it.

    python make_tiny_models.py OUTDIR [--no-gguf] [--layers 2] [--hidden 256] [--seed 0]

writes
    OUTDIR/llama-tiny-hf/       config.json, model.safetensors (fp16), tokenizer.json,
                                tokenizer_config.json (ChatML chat_template), chat_template.jinja,
                                special_tokens_map.json, generation_config.json. ExLlamaV2 loads
                                it as is; the EXL2/EXL3 converters take it as input.
    OUTDIR/llama-tiny-f16.gguf  the same weights and tokenizer for llama.cpp (F16, norms F32).

The tokenizer is a byte-level BPE (GPT-2 style, vocab 512 with <|endoftext|>, <|im_start|>,
<|im_end|>) trained on a small built-in corpus, so any UTF-8 text tokenizes. A constant "bias
channel" (hidden dim 0 is 5.0 in every embedding and no layer writes to it) turns column 0 of
lm_head into a per-token logit bias: byte tokens that would produce control characters or partial
UTF-8 are practically never sampled, nor are <|endoftext|> and <|im_start|>; <|im_end|> gets
--eos-bias (default -10: generation runs to max_tokens). Streamed text therefore concatenates to
exactly the non-streamed text, on every backend.

Needs torch, transformers, tokenizers, safetensors, numpy and gguf; nothing from the gateway.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello world! How are you today? I am fine, thank you.
You are a helpful assistant. The user asks a question and the assistant answers it in a few words.
What is the capital of France? The capital of France is Paris. What is the capital of Italy? Rome.
Tell me a story about a small robot that learns to talk. Once upon a time there was a little model
that ran on a laptop. It could only say a few words, but it tried very hard every single day.
This is a test of the gateway. Please reply with a short answer. Stop here. Count to ten, please.
system user assistant tool function call result error stream chunk token model request response
An OpenAI compatible chat completions endpoint returns JSON with choices, usage and finish reasons.
def main(): print("hello") return 0  # numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 2025
one two three four five six seven eight nine ten eleven twelve red green blue yellow black white
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June
The cache holds keys and values; prefix reuse saves prefill time. Batching serves many streams.
"""


@dataclass(frozen=True)
class Shape:
    vocab: int = 512
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    context: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# --------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with the ChatML specials at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def tokenizer_files(out: Path, tok: Any, shape: Shape) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.context,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    write_json(out / "tokenizer_config.json", config)
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": SPECIAL_TOKENS[BOS_ID],
            "eos_token": SPECIAL_TOKENS[EOS_ID],
            "pad_token": SPECIAL_TOKENS[PAD_ID],
        },
    )


def logit_bias(tok: Any, vocab: int, eos_bias: float) -> np.ndarray:
    """-10 for tokens never to sample: control bytes, bytes >= 0x7F, <|endoftext|>, <|im_start|>."""
    from tokenizers import decoders

    decoder = decoders.ByteLevel()
    bias = np.zeros(vocab, np.float32)
    for tid in range(vocab):
        piece = tok.id_to_token(tid)
        if piece is None:
            bias[tid] = -10.0
            continue
        text = decoder.decode([piece]) if tid >= len(SPECIAL_TOKENS) else ""
        if "\ufffd" in text or any(ord(c) >= 0x7F or (ord(c) < 0x20 and c != "\n") for c in text):
            bias[tid] = -10.0
    bias[PAD_ID] = bias[BOS_ID] = -10.0
    bias[EOS_ID] = eos_bias
    return bias


# ---------------------------------------------------------------------------------------- HF model


def make_hf(out: Path, shape: Shape, seed: int, eos_bias: float) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(shape.vocab)
    tokenizer_files(out, tok, shape)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.context,
        rms_norm_eps=shape.rms_eps,
        rope_theta=shape.rope_theta,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        init_weights(model, torch.from_numpy(logit_bias(tok, shape.vocab, eos_bias)))
    model = model.to(torch.float16)
    model.save_pretrained(str(out), safe_serialization=True)
    patch_config(out / "config.json", shape)
    write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID},
    )
    return out


def init_weights(model: Any, bias: Any) -> None:
    """Random weights with the bias channel (emb[:, 0] = 5, lm_head[:, 0] = bias)."""
    import torch

    def normal(t: Any, std: float) -> None:
        t.copy_(torch.randn_like(t, dtype=torch.float32) * std)

    emb = model.model.embed_tokens.weight
    normal(emb, 0.5)
    emb[:, 0] = 5.0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        ):
            normal(lin.weight, 0.05)
        attn.o_proj.weight[0, :] = 0.0
        mlp.down_proj.weight[0, :] = 0.0
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
    model.model.norm.weight.fill_(1.0)
    head = model.lm_head.weight
    normal(head, 0.1)
    head[:, 0] = bias.to(head.dtype)


def patch_config(path: Path, shape: Shape) -> None:
    """Top-level keys that transformers 5 stopped writing but ExLlamaV2/V3 and converters read."""
    cfg = json.loads(path.read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    cfg["rope_theta"] = shape.rope_theta
    cfg["torch_dtype"] = "float16"
    cfg.setdefault("rope_scaling", None)
    cfg["head_dim"] = shape.head_dim
    write_json(path, cfg)


# -------------------------------------------------------------------------------------------- GGUF


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved one (as convert_hf_to_gguf.py)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")  # model.layers.N.<module>.<proj>.weight
    n, module = parts[2], ".".join(parts[3:-1])
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    return f"blk.{n}.{names[module]}.weight"


def vocab_from_tokenizer(path: Path, vocab: int) -> tuple[list[str], list[str]]:
    """(tokens by id, padded to `vocab`, and merges as "a b" strings) from tokenizer.json."""
    data = json.loads(path.read_text())
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in data.get("added_tokens", [])})
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


def make_gguf(hf_dir: Path, out: Path) -> Path:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    n_head, n_kv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    tokens, merges = vocab_from_tokenizer(hf_dir / "tokenizer.json", vocab)
    types = [
        gguf.TokenType.CONTROL
        if t in SPECIAL_TOKENS
        else gguf.TokenType.UNUSED
        if t.startswith("[PAD")
        else gguf.TokenType.NORMAL
        for t in tokens
    ]

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("llama-tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(tok_cfg["chat_template"])

    tensors = load_file(str(hf_dir / "model.safetensors"))
    for hf_name in sorted(tensors, key=tensor_order):
        arr = tensors[hf_name].astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            arr = permute_rope(arr, n_head)
        elif hf_name.endswith("k_proj.weight"):
            arr = permute_rope(arr, n_kv)
        w.add_tensor(gguf_name(hf_name), arr if arr.ndim == 1 else arr.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def tensor_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1, name)


# --------------------------------------------------------------------------------------------- CLI


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--no-gguf", action="store_true", help="only the HF checkpoint")
    ap.add_argument(
        "--gguf-only", action="store_true", help="only convert an existing OUTDIR/llama-tiny-hf"
    )
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--eos-bias",
        type=float,
        default=-10.0,
        help="logit bias of <|im_end|>: -10 never stops by itself, 1.0 stops after ~20 tokens",
    )
    a = ap.parse_args(argv)
    shape = Shape(layers=a.layers, hidden=a.hidden, intermediate=2 * a.hidden)
    hf_dir = a.outdir / "llama-tiny-hf"
    t = time.time()
    if not a.gguf_only:
        make_hf(hf_dir, shape, a.seed, a.eos_bias)
        print(f"hf   {hf_dir} {dir_size(hf_dir)} bytes {time.time() - t:.1f}s", flush=True)
    if not a.no_gguf:
        t = time.time()
        path = make_gguf(hf_dir, a.outdir / "llama-tiny-f16.gguf")
        print(f"gguf {path} {path.stat().st_size} bytes {time.time() - t:.1f}s", flush=True)
    return 0


def dir_size(path: Path) -> int:
    return sum(os.path.getsize(p) for p in path.iterdir() if p.is_file())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
