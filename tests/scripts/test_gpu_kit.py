"""The GPU kit's dry run: CI checks the manifest (when a kit is present) and the size budget."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def dry_run(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        # the real-sizes and speculative passes have tests of their own
        env={**os.environ, "GPU_CHECK_DRY_SIZES": "0", "GPU_CHECK_DRY_SPEC": "0", **env},
        check=False,
    )


def test_dry_run_passes_for_the_kit_in_this_checkout() -> None:
    result = dry_run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run OK" in result.stdout
    assert "device limit 64 MiB" in result.stdout


def test_dry_run_without_a_kit_lists_what_would_travel(tmp_path: Path) -> None:
    result = dry_run(GPU_KIT_DIR=str(tmp_path / "absent"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "llama_cpp_python" in result.stdout
    assert "exllamav2_ext" in result.stdout


@pytest.mark.skipif(not (ROOT / ".gpu-kit" / "MANIFEST").is_file(), reason="no kit built here")
def test_dry_run_catches_a_tampered_kit(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    shutil.copytree(ROOT / ".gpu-kit", kit)
    victim = next(p for p in sorted((kit / "wheels").iterdir()) if p.suffix == ".whl")
    victim.write_bytes(victim.read_bytes() + b"x")
    (kit / "stray.txt").write_text("not in the manifest")
    result = dry_run(GPU_KIT_DIR=str(kit))
    assert result.returncode != 0
    assert "SIZE" in result.stdout
    assert "UNLISTED" in result.stdout
