"""EXL2 (and fp16 Hugging Face) models through ExLlamaV2's dynamic generator.

Registered as backend ``exllamav2``; needs the ``exllamav2`` extra and a CUDA GPU, imported
only when a model loads.
"""

from __future__ import annotations

from backends._exllama.backend import ExllamaBackend
from backends._exllama.memory import estimate
from backends.exllamav2.config import ExLlamaV2ModelConfig
from backends.exllamav2.model import load
from gateway.backend import MemoryEstimate
from gateway.config import ModelConfig


class ExLlamaV2Factory:
    config_type = ExLlamaV2ModelConfig

    def create(self, name: str, config: ModelConfig) -> ExllamaBackend:
        assert isinstance(config, ExLlamaV2ModelConfig)
        return ExllamaBackend(name, config, load, library="exllamav2")

    def memory_estimate(self, config: ModelConfig, gpu_devices: int) -> MemoryEstimate:
        """From config.json and the safetensors headers (see backends._exllama.memory)."""
        assert isinstance(config, ExLlamaV2ModelConfig)
        bits = {"fp16": None, "q8": 8, "q6": 6, "q4": 4}[config.kv_cache.mode]
        paged = config.batching.paged != "off"
        return estimate(config, gpu_devices, k_bits=bits, v_bits=bits, paged=paged)


factory = ExLlamaV2Factory()
