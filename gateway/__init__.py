"""An OpenAI-compatible gateway that routes requests to pluggable inference backends."""

__version__ = "0.1.0"
