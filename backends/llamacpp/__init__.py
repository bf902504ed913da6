"""llama.cpp backend: GGUF models with continuous batching and a prefix-aware KV cache.

Registered as ``llamacpp`` in the ``gateway.backends`` entry-point group. Importing this
package does not import ``llama_cpp``; that happens when a model starts.
"""

from __future__ import annotations

from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.config import LlamaCppConfig
from backends.llamacpp.kv_tiers import SharedTiers
from gateway.backend import MemoryEstimate
from gateway.config import ModelConfig

__all__ = ["LlamaCppBackend", "LlamaCppConfig", "factory"]


class LlamaCppFactory:
    config_type = LlamaCppConfig

    def __init__(self) -> None:
        #: Each model's KV tiers, kept across its loads (by everything they depend on, so a
        #: reloaded config that changes them gets new ones).
        self._tiers: dict[tuple[object, ...], SharedTiers] = {}

    def create(self, name: str, config: ModelConfig) -> LlamaCppBackend:
        assert isinstance(config, LlamaCppConfig)
        kv = config.kv_cache
        key = (
            name, config.local_path or config.hf, config.flash_attn, kv.type_k, kv.type_v,
            kv.host_cache_bytes, kv.disk_cache_bytes, kv.disk_dir(),
        )  # fmt: skip
        return LlamaCppBackend(name, config, self._tiers.setdefault(key, SharedTiers()))

    def memory_estimate(self, config: ModelConfig, gpu_devices: int) -> MemoryEstimate:
        """From the GGUF header (see :mod:`backends.llamacpp.memory`); nothing is loaded. A Hub
        model is estimated once its files are in place (:meth:`LlamaCppConfig.with_local_files`,
        ``gateway.hub.plan.planned_config``): this never asks the network."""
        from backends.llamacpp.memory import estimate

        assert isinstance(config, LlamaCppConfig)
        return estimate(config, gpu_devices)


factory = LlamaCppFactory()
