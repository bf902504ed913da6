"""Backend ``openai``: a model served by remote OpenAI-compatible replicas over httpx."""

from __future__ import annotations

from backends.openai.backend import OpenAIBackend
from backends.openai.config import OpenAIConfig
from gateway.config import ModelConfig


class OpenAIFactory:
    config_type = OpenAIConfig

    def create(self, name: str, config: ModelConfig) -> OpenAIBackend:
        assert isinstance(config, OpenAIConfig)
        return OpenAIBackend(name, config)


factory = OpenAIFactory()

__all__ = ["OpenAIBackend", "OpenAIConfig", "factory"]
