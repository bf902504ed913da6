"""Download progress as huggingface_hub reports it: a plain HTTP download counts its bytes once
(written and received), and the Xet path's two reports (bytes reconstructed into the file,
bytes received) go one to each counter: never over 100%."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter

from gateway.hub import DownloadProgress, parse_spec
from gateway.hub.fetch import fetch
from tests.gateway.hub.conftest import TINY_REPO, Hub

pytestmark = pytest.mark.timeout(30)


def _report(written: int, received: int, total: int) -> SimpleNamespace:
    return SimpleNamespace(
        total_bytes=total,
        total_bytes_completed=written,
        total_bytes_completion_rate=None,
        total_transfer_bytes_completed=received,
        total_transfer_bytes_completion_rate=None,
    )


def test_xet_reports_are_counted_once() -> None:
    progress = DownloadProgress("m")
    progress.plan(1000)
    with XetDownloadProgressReporter(
        reconstruction_desc="f", total=1000, log_level=0, tqdm_class=progress.tqdm_class()
    ) as reporter:
        assert reporter.transfer_bar is reporter.reconstruction_bar  # one bar, not two
        reporter.update_progress(_report(400, 300, 1000))
        reporter.update_progress(_report(1000, 700, 1000))
    assert progress.done_bytes == 1000  # written: 100%, not 170%
    assert progress.fetched_bytes == 700  # received (deduplicated): what the rate counts
    assert progress.as_json()["bytes"] == 1000


def test_http_download_counts_each_byte_once(hub: Hub, tiny_files: dict[str, Path]) -> None:
    progress = DownloadProgress("m")
    fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"), progress)
    size = tiny_files["Tiny-Q4_K_M.gguf"].stat().st_size
    assert progress.total_bytes == progress.done_bytes == progress.fetched_bytes == size
