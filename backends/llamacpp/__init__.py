"""llama.cpp backend: GGUF models with continuous batching and a prefix-aware KV cache.

Registered as ``llamacpp`` in the ``gateway.backends`` entry-point group. Importing this
package does not import ``llama_cpp``; that happens when a model starts.
"""

from __future__ import annotations

from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.config import LlamaCppConfig
from gateway.backend import MemoryEstimate
from gateway.config import ModelConfig

__all__ = ["LlamaCppBackend", "LlamaCppConfig", "factory"]


class LlamaCppFactory:
    config_type = LlamaCppConfig

    def create(self, name: str, config: ModelConfig) -> LlamaCppBackend:
        assert isinstance(config, LlamaCppConfig)
        return LlamaCppBackend(name, config)

    def memory_estimate(self, config: ModelConfig, gpu_devices: int) -> MemoryEstimate:
        """From the GGUF header (see :mod:`backends.llamacpp.memory`); nothing is loaded."""
        from backends.llamacpp.memory import estimate

        assert isinstance(config, LlamaCppConfig)
        return estimate(config, gpu_devices)


factory = LlamaCppFactory()
