"""``gateway pull``: a fetch with a rich progress bar (the download runs in a thread; Ctrl-C
stops it at its next chunk, its partial file kept to be resumed)."""

from __future__ import annotations

import threading
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from gateway.hub.fetch import fetch
from gateway.hub.progress import DownloadProgress
from gateway.hub.spec import HubSource


def pull_with_bar(source: HubSource, progress: DownloadProgress) -> Path:
    result: list[Path] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fetch(source, progress))
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    worker = threading.Thread(target=run, name=f"pull {source.label}", daemon=True)
    columns = (
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(source.label, total=None)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)
                total = progress.total_bytes or None
                bar.update(task, total=total, completed=progress.done_bytes)
        except KeyboardInterrupt:
            progress.cancel()
            worker.join(10)
            raise
        bar.update(task, total=progress.total_bytes, completed=progress.done_bytes)
    if failure:
        raise failure[0]
    return result[0]
