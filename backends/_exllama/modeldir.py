"""What a Hugging Face model directory says about prompts: chat template, BOS, EOS.

Read from the files as transformers saves them, without the inference library (so it is
checked on a CPU): ``tokenizer_config.json`` (``chat_template``, ``bos_token``, ``eos_token``,
``add_bos_token``), ``chat_template.jinja`` (newer transformers), ``chat_template.json``,
``tokenizer.json`` (whether its post-processor adds BOS), ``config.json`` and
``generation_config.json`` (``eos_token_id``: one id or a list).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelDirError(Exception):
    """A model directory's tokenizer files are missing or unreadable; the message names them."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ModelDirError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return data


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _template_source(value: object) -> str | None:
    """``chat_template`` is a string, or a list of {"name", "template"} (pick "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            t.get("name"): t.get("template")
            for t in value
            if isinstance(t, dict) and isinstance(t.get("template"), str)
        }
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def _post_processor_adds_bos(tokenizer_json: dict[str, Any], bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor puts ``bos`` before a single sequence."""
    if bos is None:
        return False
    stack = [tokenizer_json.get("post_processor")]
    while stack:
        proc = stack.pop()
        if not isinstance(proc, dict):
            continue
        if proc.get("type") == "Sequence":
            stack.extend(proc.get("processors") or [])
        elif proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0] if single and isinstance(single[0], dict) else {}
            special = first.get("SpecialToken")
            if isinstance(special, dict) and special.get("id") == bos:
                return True
    return False


@dataclass(frozen=True, slots=True)
class TokenizerFacts:
    """What the model directory says about templates and BOS."""

    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos: bool

    @classmethod
    def from_model_dir(cls, model_dir: Path, template_file: Path | None = None) -> TokenizerFacts:
        cfg = _read_json(model_dir / "tokenizer_config.json")
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        explicit = cfg.get("add_bos_token")
        if isinstance(explicit, bool):
            add_bos = explicit and bos is not None
        else:
            add_bos = _post_processor_adds_bos(_read_json(model_dir / "tokenizer.json"), bos)
        return cls(_find_template(model_dir, cfg, template_file), bos, eos, add_bos)


def _find_template(model_dir: Path, cfg: dict[str, Any], template_file: Path | None) -> str | None:
    """The operator's file, else chat_template.jinja, else tokenizer_config.json's, else
    chat_template.json's (as processors save it)."""
    if template_file is not None:
        try:
            return template_file.read_text(encoding="utf-8")
        except OSError as err:
            raise ModelDirError(f"cannot read chat_template_file {template_file}: {err}") from err
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    source = _template_source(cfg.get("chat_template"))
    if source is not None:
        return source
    return _template_source(_read_json(model_dir / "chat_template.json").get("chat_template"))


def _ids(value: object) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def eos_token_ids(model_dir: Path, *extra: int | None) -> tuple[int, ...]:
    """Every end-of-sequence id: config.json's, generation_config.json's and ``extra``."""
    ids = _ids(_read_json(model_dir / "config.json").get("eos_token_id"))
    ids |= _ids(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
    ids |= {e for e in extra if e is not None}
    return tuple(sorted(ids))
