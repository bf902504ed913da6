"""EXL3 (and fp16 Hugging Face) models through exllamav3's generator.

Registered as backend ``exllamav3``; needs the ``exllamav3`` extra and a CUDA GPU, imported
only when a model loads.
"""

from __future__ import annotations

from backends._exllama.backend import ExllamaBackend
from backends._exllama.memory import estimate
from backends.exllamav3.config import ExLlamaV3ModelConfig
from backends.exllamav3.model import SPARE_TOKENS, load
from gateway.backend import MemoryEstimate
from gateway.config import ModelConfig


class ExLlamaV3Factory:
    config_type = ExLlamaV3ModelConfig

    def create(self, name: str, config: ModelConfig) -> ExllamaBackend:
        assert isinstance(config, ExLlamaV3ModelConfig)
        return ExllamaBackend(name, config, load, library="exllamav3")

    def memory_estimate(self, config: ModelConfig, gpu_devices: int) -> MemoryEstimate:
        """From config.json and the safetensors headers (see backends._exllama.memory)."""
        assert isinstance(config, ExLlamaV3ModelConfig)
        kv = config.kv_cache
        return estimate(
            config,
            gpu_devices,
            k_bits=kv.k_bits,
            v_bits=kv.v_bits,
            paged=True,
            spare_tokens=SPARE_TOKENS,
        )


factory = ExLlamaV3Factory()
