"""llama.cpp backend: GGUF models with continuous batching and a prefix-aware KV cache.

Registered as ``llamacpp`` in the ``gateway.backends`` entry-point group. Importing this
package does not import ``llama_cpp``; that happens when a model starts.
"""

from __future__ import annotations

from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.config import LlamaCppConfig
from gateway.config import ModelConfig

__all__ = ["LlamaCppBackend", "LlamaCppConfig", "factory"]


class LlamaCppFactory:
    config_type = LlamaCppConfig

    def create(self, name: str, config: ModelConfig) -> LlamaCppBackend:
        assert isinstance(config, LlamaCppConfig)
        return LlamaCppBackend(name, config)


factory = LlamaCppFactory()
