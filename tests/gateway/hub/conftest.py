"""Fixtures: a Hugging Face Hub stand-in on 127.0.0.1 with repos of tiny GGUFs, and the
``huggingface_hub`` client of this process (and of subprocesses, by env) pointed at it with a
fresh ``HF_HOME``."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import constants

from tests.backends.llamacpp.tiny_gguf import write_tiny_gguf
from tests.gateway.hub.hub_server import HubState, hub_env, hub_server, point_hub_client
from tests.gateway.hub.split_gguf import split_gguf

TINY_REPO = "test-org/Tiny-GGUF"


@dataclass
class Hub:
    url: str
    state: HubState
    home: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def cache(self) -> Path:
        return self.home / "hub"

    def env(self, *, offline: bool = False) -> dict[str, str]:
        """The environment of a ``gateway`` subprocess using this Hub and cache."""
        return {**os.environ, **hub_env(self.url, self.home, offline=offline)}

    def offline(self, on: bool = True) -> None:
        self.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", on)

    def gets(self) -> list[str]:
        """The paths of every file body the Hub served."""
        return [p for m, p, _ in self.state.log if m == "GET" and "/resolve/" in p]


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny repo's files: two quants (one split in three), a projector, a README."""
    folder = tmp_path_factory.mktemp("tiny-repo")
    tiny = write_tiny_gguf(folder / "tiny.gguf")
    other = write_tiny_gguf(folder / "other.gguf", seed=1)
    shards = split_gguf(tiny, folder / "split", "Tiny-Q8_0", 8)
    (folder / "README.md").write_text("# tiny\n")
    return {
        "Tiny-Q4_K_M.gguf": tiny,
        "tiny-q4_0.gguf": other,
        **{p.name: p for p in shards},
        "mmproj-Tiny-F16.gguf": other,
        "README.md": folder / "README.md",
    }


@pytest.fixture
def hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_files: dict[str, Path]
) -> Iterator[Hub]:
    state = HubState()
    state.add_repo(TINY_REPO, tiny_files)
    home = tmp_path / "hf-home"
    with hub_server(state) as url:
        for name, value in point_hub_client(url, home).items():
            monkeypatch.setattr(constants, name, value)
        for name, value in hub_env(url, home).items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield Hub(url, state, home, monkeypatch)


def gateway_cli() -> list[str]:
    return [sys.executable, "-m", "gateway"]
