"""``bench/bench_speculative.py`` refuses an edit task it cannot pose before it starts a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_an_edit_file_cut_before_any_name_to_rename_is_refused() -> None:
    run = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "bench_speculative.py"),
            "--edit-tokens", "5", "--tasks", "edit", "--skip-peer",
        ],
        capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "--edit-tokens 5: the cut file has no name to rename" in run.stderr
    assert "starting" not in run.stdout  # no server was started
