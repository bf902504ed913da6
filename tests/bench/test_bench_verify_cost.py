"""``bench/bench_verify_cost.py`` runs on the real SmolLM2 file (two sequences decoding together)
and reports what it measured: one row per context length and draft length, each ceiling computed
from that row's own step and the one-token step of the same context."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_verify_cost_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    args = ["--cells", "16,40", "--drafts", "1,3", "--seqs", "2", "--reps", "1", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_verify_cost.py"), *args],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ceiling if all taken" in run.stdout
    data = json.loads(out.read_text())
    assert data["device"] == "CPU" and data["gguf"].endswith(".gguf") and data["seqs"] == 2
    rows = data["costs"]
    assert [(r["cells"], r["draft"]) for r in rows] == [
        (16, 0),
        (16, 1),
        (16, 3),
        (40, 0),
        (40, 1),
        (40, 3),
    ]
    for r in rows:
        one = next(o for o in rows if o["cells"] == r["cells"] and o["draft"] == 0)
        assert r["step_ms"] > 0 and r["one_token_ms"] == one["step_ms"]
        assert r["ceiling"] == pytest.approx((r["draft"] + 1) * one["step_ms"] / r["step_ms"])


@pytest.mark.timeout(60)
def test_verify_cost_rejects_bad_lengths() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_verify_cost.py"), "--drafts", "0,4"],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert run.returncode == 2 and "positive numbers" in run.stderr


@pytest.mark.timeout(60)
def test_verify_cost_says_which_model_file_it_cannot_load(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_verify_cost.py"), "--gguf", str(missing)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert run.returncode == 1 and f"cannot load {missing}" in run.stderr
