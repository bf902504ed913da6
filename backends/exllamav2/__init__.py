"""EXL2 (and fp16 Hugging Face) models through ExLlamaV2's dynamic generator.

Registered as backend ``exllamav2``; needs the ``exllamav2`` extra and a CUDA GPU, imported
only when a model loads.
"""

from __future__ import annotations

from backends._exllama.backend import ExllamaBackend
from backends.exllamav2.config import ExLlamaV2ModelConfig
from backends.exllamav2.model import load
from gateway.config import ModelConfig


class ExLlamaV2Factory:
    config_type = ExLlamaV2ModelConfig

    def create(self, name: str, config: ModelConfig) -> ExllamaBackend:
        assert isinstance(config, ExLlamaV2ModelConfig)
        return ExllamaBackend(name, config, load, library="exllamav2")


factory = ExLlamaV2Factory()
