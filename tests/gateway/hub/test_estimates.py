"""Memory estimates of Hub models: from the files they were fetched to (a GGUF, an ExLlama
folder), in ``gateway plan`` and in the lifecycle's budget; never asking the network under the
load lock."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import gateway.hub.fetch as fetching
from gateway.config import LifecycleConfig, parse_config
from gateway.hub import HubError, HubSource, NotDownloaded, parse_spec
from gateway.hub.fetch import fetch
from gateway.lifecycle import Lifecycle, estimate_memory
from gateway.planner import Device, make_plan
from gateway.pool import ModelEntry
from tests.backends.exllama.test_memory import HF, write_safetensors
from tests.gateway.hub.conftest import TINY_REPO, Hub

pytestmark = pytest.mark.timeout(60)

EXL_REPO = "test-org/Tiny-exl2"


@pytest.fixture
def exl_repo(hub: Hub, tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "exl2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF))
    write_safetensors(
        folder / "model.safetensors", {"model.embed_tokens.weight": ("F16", [100, 64], 12800)}
    )
    files = {p.name: p for p in folder.iterdir()}
    hub.state.add_repo(EXL_REPO, files)
    return files


def _config(**models: dict[str, Any]) -> Any:
    return parse_config({"models": models}, "<test>")


def _no_network(source: HubSource) -> Any:
    raise AssertionError(f"the network was asked for {source.label}")


def test_plan_estimates_a_cached_exllama_model(hub: Hub, exl_repo: dict[str, Path]) -> None:
    config = _config(exl={"backend": "exllamav2", "hf": EXL_REPO})
    before = make_plan(config, [Device("GPU", 24 << 30)], 0).models[0]
    assert before.estimate is None and before.problem is not None
    assert "not downloaded" in before.problem
    fetch(parse_spec(EXL_REPO, kind="folder"))
    hub.monkeypatch.setattr(fetching, "resolve", _no_network)
    after = make_plan(config, [Device("GPU", 24 << 30)], 0).models[0]
    assert after.problem is None and after.estimate is not None
    assert after.estimate.weights_bytes > 0


def test_lifecycle_estimates_the_fetched_files(hub: Hub) -> None:
    table = {"backend": "llamacpp", "hf": TINY_REPO, "quant": "Q4_K_M"}
    config = _config(tiny=table).models["tiny"]

    async def main() -> None:
        lifecycle: Lifecycle[ModelEntry] = Lifecycle(LifecycleConfig())
        entry = ModelEntry("tiny", config, lifecycle)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fetching, "resolve", _no_network)
            assert estimate_memory(entry, 0) is None  # not fetched: no estimate, no network
        path = fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"))
        entry._local = path
        entry.backend = entry._new_backend()
        hub.monkeypatch.setattr(fetching, "resolve", _no_network)
        estimate = estimate_memory(entry, 0)
        assert estimate is not None and estimate.weights_bytes > 0
        assert entry.effective_config.hub_source() is None  # type: ignore[attr-defined]

    asyncio.run(main())


def test_a_half_fetched_folder_is_not_cached(hub: Hub, exl_repo: dict[str, Path]) -> None:
    from gateway.hub.fetch import cached_path

    source = parse_spec(EXL_REPO, kind="folder")
    hub.state.corrupt.add("model.safetensors")  # config.json arrives, the weights do not
    with pytest.raises(HubError, match="corrupt"):
        fetch(source)
    snapshots = hub.cache / "models--test-org--Tiny-exl2" / "snapshots"
    assert [p.name for p in snapshots.glob("*/*")] == ["config.json"]
    assert cached_path(source) is None
    hub.offline()
    with pytest.raises(NotDownloaded):
        fetch(source)
    hub.offline(False)
    hub.state.corrupt.clear()
    folder = fetch(source)
    assert cached_path(source) == folder
    (folder / "model.safetensors").unlink()  # removed by hand: not complete any more
    assert cached_path(source) is None


def test_an_in_place_reload_keeps_the_fetched_path(tmp_path: Path) -> None:
    """The entry keeps the fetched files' path only: a table changed in place (aliases) is
    what its next backend gets, with that path."""
    table = {"backend": "llamacpp", "hf": TINY_REPO, "quant": "Q4_K_M"}
    old = _config(tiny=table).models["tiny"]
    new = _config(tiny={**table, "aliases": ["small"]}).models["tiny"]

    async def main() -> None:
        entry = ModelEntry("tiny", old, Lifecycle(LifecycleConfig()))
        entry._local = tmp_path / "m.gguf"
        entry.config = new
        effective = entry.effective_config
        assert list(effective.aliases) == ["small"]
        assert effective.model_path == tmp_path / "m.gguf"  # type: ignore[attr-defined]

    asyncio.run(main())
