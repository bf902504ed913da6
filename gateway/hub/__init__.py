"""Models from the Hugging Face Hub, in the standard Hugging Face cache (``huggingface_hub``).

A config names a source (``hf = "org/repo"`` with ``file`` or ``quant``, ``revision``); it is
resolved lazily: nothing is downloaded while a config is validated or planned.
"""

from gateway.hub.errors import DownloadCancelled, HubError, NotDownloaded
from gateway.hub.progress import DownloadProgress
from gateway.hub.source import HubSourced, hub_source_of
from gateway.hub.spec import HubSource, looks_like_hub_spec, parse_spec

__all__ = [
    "DownloadCancelled",
    "DownloadProgress",
    "HubError",
    "HubSource",
    "HubSourced",
    "NotDownloaded",
    "hub_source_of",
    "looks_like_hub_spec",
    "parse_spec",
]
