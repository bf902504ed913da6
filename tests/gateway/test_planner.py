"""``gateway plan``: GPU targets, nvidia-smi, host memory, fit and advice (scripted estimates)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import parse_config
from gateway.planner import (
    Device,
    GiB,
    MiB,
    detect_gpus,
    host_memory,
    make_plan,
    parse_gpu_target,
)

runner = CliRunner()


@pytest.mark.parametrize(
    ("spec", "count", "name", "total"),
    [
        ("H100-80GB", 1, "H100-80GB", 81559 * MiB),
        ("h100", 1, "H100-94GB", 95830 * MiB),  # the largest of that name
        ("2xL4", 2, "L4-24GB", 23034 * MiB),
        ("2 x A100-40GB", 2, "A100-40GB", 40960 * MiB),
        ("24GB", 1, "GPU-24GB", 24 * GiB),
        ("MI300-192GB", 1, "MI300-192GB", 192 * GiB),  # unknown name, known size
    ],
)
def test_gpu_targets(spec: str, count: int, name: str, total: int) -> None:
    devices = parse_gpu_target(spec)
    assert devices == [Device(name, total)] * count


@pytest.mark.parametrize("spec", ["XYZ", "0xH100", "", "H100-eighty", "99xL4"])
def test_bad_gpu_targets(spec: str) -> None:
    with pytest.raises(ValueError, match="GPU target"):
        parse_gpu_target(spec)


def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_detect_gpus_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(
        tmp_path,
        monkeypatch,
        'echo "NVIDIA H100 80GB HBM3, 81559, 1024"\necho "NVIDIA H100 80GB HBM3, 81559, 0"\n',
    )
    assert detect_gpus() == [
        Device("NVIDIA H100 80GB HBM3", 81559 * MiB, 1024 * MiB),
        Device("NVIDIA H100 80GB HBM3", 81559 * MiB, 0),
    ]


def test_a_failing_nvidia_smi_means_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "NVIDIA-SMI has failed" >&2\nexit 9\n')
    assert detect_gpus() == []


def test_host_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n")
    assert host_memory(meminfo) == Device("host", 16000000 * 1024, 4000000 * 1024)
    assert host_memory(tmp_path / "missing").total_bytes == 0


CONFIG = """
[models.small]
backend = "scripted"
weights_bytes = 300_000_000
kv_cache_bytes = 100_000_000

[models.big]
backend = "scripted"
weights_bytes = 900_000_000
compute_bytes = 200_000_000
"""


def test_plan_fits_and_shortfalls() -> None:
    cfg = parse_config(
        {
            "models": {
                "small": {"backend": "scripted", "weights_bytes": 300 * MiB},
                "big": {"backend": "scripted", "weights_bytes": 950 * MiB, "compute_bytes": MiB},
            }
        },
        "<test>",
    )
    plan = make_plan(cfg, [Device("GPU-1GB", GiB)], reserve_bytes=100 * MiB)
    small, big = plan.models
    assert small.fits and small.estimate is not None
    assert small.estimate.gpu_bytes == (300 * MiB,)
    assert not big.fits and big.short == {"GPU 0": 951 * MiB - 924 * MiB}
    assert plan.together()["GPU 0"] == (1251 * MiB, 924 * MiB)
    assert not plan.all_fit


def test_cli_plan_advises_a_budget_and_fails_when_a_model_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CONFIG)
    result = runner.invoke(app, ["plan", str(path), "--gpu", "1GB", "--reserve-gib", "0"])
    assert result.exit_code == 1, result.output
    out = result.output
    assert "big does not fit" in out and "1 of 2 model(s) fit on their own" in out
    assert "[lifecycle]" in out and f"gpu_memory_bytes = [{GiB}]" in out
    result = runner.invoke(app, ["plan", str(path), "--gpu", "3GB"])
    assert result.exit_code == 0, result.output
    assert "they fit at once" in result.output


def test_cli_plan_rejects_an_unknown_gpu(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CONFIG)
    result = runner.invoke(app, ["plan", str(path), "--gpu", "potato"])
    assert result.exit_code == 2 and "unknown GPU" in result.output


def test_cli_plan_on_the_host_without_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    path = tmp_path / "c.toml"
    path.write_text(CONFIG)
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "no GPU: every model planned on the host" in result.output
