"""A tiny random-weight llama GGUF for tests: cheap, deterministic, with a real tokenizer.

Written with the ``gguf`` package and numpy (no model hub, no llama.cpp build). It has a
byte-level BPE vocabulary (any UTF-8 text tokenizes), ChatML control tokens and template, and
outputs shaped through "channels" of the hidden state that no layer writes to:

* dimension 0 of every token embedding is a constant, so column 0 of the output matrix acts as
  a per-token logit bias: control bytes, stray UTF-8 continuation bytes and EOS are (almost)
  never sampled, so output is printable text and generations run to ``max_tokens``;
* dimensions 1..k carry "triggers": the byte that starts a multi-byte character (e.g. 0xF0 of
  😀) forces its next byte, and so on to the end of the character. So the model writes emoji,
  CJK and accented letters, each spread over several tokens, and never broken UTF-8.
"""

from __future__ import annotations

import collections
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class Vocab:
    """A model family's chat template and the tokens it needs beyond the byte-level BPE."""

    template: str = CHATML_TEMPLATE
    control: tuple[str, ...] = SPECIAL_TOKENS
    #: Added tokens that are not control tokens (Qwen's ``<tool_call>``).
    user_defined: tuple[str, ...] = ()
    bos: str = "<|im_start|>"
    eos: str = "<|im_end|>"
    pad: str = "<|endoftext|>"
    add_bos: bool = False


CHATML = Vocab()
#: Characters the model writes one byte-token at a time (all their bytes distinct).
MULTIBYTE_CHARS = ("😀", "中", "é")

CORPUS = """
The quick brown fox jumps over the lazy dog. Hello world! How are you today?
You are a helpful assistant. The user asks a question and the assistant answers.
What is the capital of France? The capital of France is Paris. Tell me a story
about a small robot that learns to talk. Once upon a time there was a little
model that ran on a laptop. It could only say a few words, but it tried hard.
OpenAI compatible chat completions endpoint returns JSON with choices and usage.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE symbols)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def train_bpe(corpus: str, n_merges: int) -> tuple[list[str], list[str]]:
    b2u = bytes_to_unicode()
    vocab = [b2u[b] for b in range(256)]
    known = set(vocab)
    words = collections.Counter(re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", corpus))
    seqs = {w: tuple(b2u[b] for b in w.encode()) for w in words}
    merges: list[str] = []
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, count in words.items():
            s = seqs[w]
            for pair in itertools.pairwise(s):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append(f"{a} {b}")
        if a + b not in known:
            vocab.append(a + b)
            known.add(a + b)
        for w in words:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)
    return vocab, merges


def write_tiny_gguf(
    path: Path,
    *,
    vocab: Vocab = CHATML,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    seed: int = 0,
) -> Path:
    """Write the model to ``path`` (about 250 KB, well under a second) and return ``path``."""
    bpe, merges = train_bpe(CORPUS, 200)
    added = (*vocab.control, *vocab.user_defined)
    tokens = [*added, *bpe]
    n_vocab = len(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    b2u = bytes_to_unicode()

    def byte_token(b: int) -> int:
        return index[b2u[b]]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(2 * n_embd)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    types = [gguf.TokenType.CONTROL] * len(vocab.control)
    types += [gguf.TokenType.USER_DEFINED] * len(vocab.user_defined)
    w.add_token_types(types + [gguf.TokenType.NORMAL] * len(bpe))
    w.add_token_merges(merges)
    w.add_bos_token_id(index[vocab.bos])
    w.add_eos_token_id(index[vocab.eos])
    w.add_pad_token_id(index[vocab.pad])
    w.add_add_bos_token(vocab.add_bos)
    w.add_chat_template(vocab.template)

    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    # Chains of forced bytes, each on its own trigger dimension.
    chains: list[tuple[int, int]] = []
    starts: set[int] = set()
    for ch in MULTIBYTE_CHARS:
        data = ch.encode()
        starts.add(data[0])
        chains += itertools.pairwise(data)
    n_reserved = 1 + len(chains)
    bias = np.zeros(n_vocab, np.float32)
    for b in range(256):
        if b >= 0x7F or (b < 0x20 and b != 0x0A):
            bias[byte_token(b)] = -10.0
    for b in starts:
        bias[byte_token(b)] = 1.0
    for name in added:
        bias[index[name]] = -10.0
    emb = mat(n_vocab, n_embd, 0.5)
    emb[:, :n_reserved] = 0.0
    emb[:, 0] = 5.0
    out = mat(n_vocab, n_embd, 1.0)
    out[:, :n_reserved] = 0.0
    out[:, 0] = bias
    for dim, (first, then) in enumerate(chains, start=1):
        emb[byte_token(first), dim] = 20.0
        out[byte_token(then), dim] = 8.0

    w.add_tensor("token_embd.weight", emb)
    for i in range(n_layer):
        wo, wd = mat(n_embd, n_embd), mat(n_embd, 2 * n_embd)
        wo[:n_reserved, :] = 0.0  # no layer writes to the reserved channels
        wd[:n_reserved, :] = 0.0
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", wo)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(2 * n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(2 * n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", wd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
