"""A Hugging Face ``tokenizer.json`` for tests: the byte-level BPE of the tiny GGUFs plus
added tokens, written by hand (what ExLlama model directories ship)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.backends.llamacpp.tiny_gguf import CORPUS, train_bpe

#: (content, special): special added tokens are control tokens; Qwen's ``<tool_call>`` is not.
ADDED = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("[TOOL_CALLS]", True),
)


def write_tokenizer_json(
    model_dir: Path, added: tuple[tuple[str, bool], ...] = ADDED
) -> dict[str, int]:
    """Write ``model_dir/tokenizer.json``; returns the added tokens' ids."""
    bpe, merges = train_bpe(CORPUS, 200)
    ids = {content: i for i, (content, _) in enumerate(added)}
    vocab = {**ids, **{piece: len(added) + i for i, piece in enumerate(bpe)}}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": ids[content],
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for content, special in added
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    return ids
