"""Issue 25's prepared GPU command, rehearsed on the CPU: ``scripts/gpu-check.sh --dry-run`` runs
the steps of ``--part speculative`` (a random-weight model of the tiny shape, what verifying drafts
costs on it, the speculative benchmark against llama-server) and each writes what it measured."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
PEERS = sorted(ROOT.glob(".peers/llama-server-*/bin/llama-server"))


@pytest.mark.timeout(120)
def test_dry_run_rehearses_the_speculative_steps_on_the_cpu(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DRY_OUTDIR": str(tmp_path),
        "GPU_CHECK_DRY_SIZES": "0",
        "GPU_CHECK_DRY_SPEC_LIMIT": "90",
    }
    if PEERS and "LLAMA_SERVER" not in env:
        env["LLAMA_SERVER"] = str(PEERS[0])
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        check=False,
    )
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("fn_*.log")))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    for fn in ("fn_spec_model", "fn_verify_cost", "fn_bench_speculative"):
        assert f"{fn}: ok" in result.stdout, fn
    assert "speculative dry run OK" in result.stdout

    cost = json.loads((tmp_path / "verify-cost.json").read_text())
    assert cost["gguf"] == "spec-tiny.gguf" and cost["device"] == "CPU"
    rows = [(c["cells"], c["draft"]) for c in cost["costs"]]
    assert rows == [(cells, k) for cells in (64, 256) for k in (0, 1, 4)]
    together = json.loads((tmp_path / "verify-cost-2-seqs.json").read_text())
    assert together["seqs"] == 2
    assert [(c["cells"], c["draft"]) for c in together["costs"]] == [(64, 0), (64, 1), (64, 4)]
    bench = json.loads((tmp_path / "speculative.json").read_text())
    configs = {r["config"] for r in bench["runs"]}
    assert {"gateway ngram", "gateway off"} <= configs
    if "LLAMA_SERVER" in env:
        assert {"llama-server ngram-mod", "llama-server off"} <= configs
    for run in bench["runs"]:
        assert run["requests"] >= 1 and run["tokens"] > 0 and run["tokens_per_s"] > 0, run
