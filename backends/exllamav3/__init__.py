"""EXL3 (and fp16 Hugging Face) models through exllamav3's generator.

Registered as backend ``exllamav3``; needs the ``exllamav3`` extra and a CUDA GPU, imported
only when a model loads.
"""

from __future__ import annotations

from backends._exllama.backend import ExllamaBackend
from backends.exllamav3.config import ExLlamaV3ModelConfig
from backends.exllamav3.model import load
from gateway.config import ModelConfig


class ExLlamaV3Factory:
    config_type = ExLlamaV3ModelConfig

    def create(self, name: str, config: ModelConfig) -> ExllamaBackend:
        assert isinstance(config, ExLlamaV3ModelConfig)
        return ExllamaBackend(name, config, load, library="exllamav3")


factory = ExLlamaV3Factory()
