"""The one error of :mod:`gateway.hub`: a one-line message naming the repo, file or quant."""

from __future__ import annotations


class HubError(Exception):
    """A model could not be resolved or fetched from the Hub (missing, gated, offline, corrupt)."""


class NotDownloaded(HubError):
    """The model's files are not in the local cache and the Hub is not to be asked."""


class DownloadCancelled(HubError):
    """The download was stopped (shutdown); its partial file stays, to be resumed."""
