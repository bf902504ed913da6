"""Issue 29's prepared GPU command, rehearsed on the CPU: ``scripts/gpu-check.sh --dry-run`` runs
every step of ``--part sizes`` (card, build, GGUF models, servers, engine profile, report) with tiny
models, and the 8B plan has Llama-3-8B's tensor types and sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def real_sizes() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "real_sizes", ROOT / "scripts" / "gpu-kit" / "real_sizes.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("real_sizes", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_8b_plan_has_the_llama3_8b_quantized_tensor_sizes() -> None:
    rs = real_sizes()
    q4 = rs.plan(rs.LLAMA3_8B, "q4_k_m")
    q8 = rs.plan(rs.LLAMA3_8B, "q8_0")
    assert len(q4) == len(q8) == 2 + 32 * 9 + 1
    assert sum(t.nbytes for t in q4) == 4_912_898_048
    assert sum(t.nbytes for t in q8) == 8_532_934_656
    six = {t.name for t in q4 if t.qtype == "Q6_K"}
    assert "output.weight" in six and "blk.0.attn_v.weight" in six
    assert "blk.4.ffn_down.weight" not in six and "blk.6.ffn_down.weight" in six
    assert len(six) == 1 + 2 * sum(rs.use_more_bits(i, 32) for i in range(32))
    assert rs.spec_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0
    assert rs.spec_bandwidth("NVIDIA H100 PCIe") == 2000.0
    assert rs.spec_bandwidth("NVIDIA H200") == 4800.0
    assert rs.spec_bandwidth("Some CPU") is None


@pytest.mark.timeout(100)
def test_dry_run_rehearses_every_real_size_step_on_the_cpu(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DRY_OUTDIR": str(tmp_path),
        "GPU_CHECK_DRY_SIZES_LIMIT": "85",
        "GPU_CHECK_DRY_SPEC": "0",  # its own test
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=95,
        env=env,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out + (tmp_path / "real-sizes.log").read_text()
    assert "real-sizes dry run OK" in out and "dry run OK" in out
    for step in ("step card", "step build", "step model q4_k_m", "step model q8_0", "step report"):
        assert step in out, step
    report = (tmp_path / "real-sizes.md").read_text()
    data = json.loads((tmp_path / "real-sizes" / "real-sizes.json").read_text())
    assert [m["quant"] for m in data["models"]] == ["q4_k_m", "q8_0"]
    # the script's own search: $LLAMA_SERVER, PATH, a binary built into .peers/
    has_peer = bool(
        os.environ.get("LLAMA_SERVER")
        or shutil.which("llama-server")
        or any(ROOT.glob(".peers/llama-server-*/bin/llama-server"))
    )
    for model in data["models"]:
        assert model["tensor_types"].get("Q6_K" if model["quant"] == "q4_k_m" else "Q8_0")
        servers = {s["server"]: s for s in model["servers"]}
        gateway = servers["gateway"]
        assert [ld["streams"] for ld in gateway["loads"]] == [1, 2]
        for ld in gateway["loads"]:
            assert ld["tokens"] == 16 * ld["streams"] and not ld["errors"], ld
        assert gateway["batch1_decode_tok_s"] > 0
        profile = gateway["loads"][-1]["profile"]
        # speculative decoding (on by default) writes several tokens in a step: fewer steps
        # than tokens, but every step was timed
        assert 0 < profile["steps"] <= 32 and profile["decode_ms"] > 0, profile
        if not has_peer:
            assert servers["llama-server"] == {
                "server": "llama-server",
                "skipped": "no llama-server binary",
            }
        peer = servers["llama_cpp.server"]
        assert "skipped" in peer or peer["loads"][0]["tokens"] == 16, peer
    assert "Engine profile (gateway, 2 streams)" in report
    assert "no GPU (CPU run)" in report and "roofline at n/a GB/s" in report
    if not has_peer:
        assert "skipped: no llama-server binary" in out
