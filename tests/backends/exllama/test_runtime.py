"""Lazy imports: a missing package names its extra; no CUDA device is one clear line."""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types

import pytest

from backends._exllama import runtime
from backends._exllama.runtime import LoadProgress, NoCudaDevice, require_library
from gateway.errors import MissingExtra


def fake_module(name: str, **attrs: object) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


@pytest.mark.parametrize("backend", ["exllamav2", "exllamav3"])
def test_missing_package_names_the_extra(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_find", lambda name: name == "torch")
    with pytest.raises(MissingExtra) as info:
        require_library(backend, backend)
    message = str(info.value)
    assert f"pip install 'llm-gateway[{backend}]'" in message
    assert repr(backend) in message and "\n" not in message


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_find", lambda name: name != "torch")
    with pytest.raises(MissingExtra, match=r"'torch'.*llm-gateway\[exllamav3\]"):
        require_library("exllamav3", "exllamav3")


def test_no_cuda_device_is_one_line_and_never_imports_the_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = types.SimpleNamespace(is_available=lambda: False)
    version = types.SimpleNamespace(cuda="13.0")
    monkeypatch.setitem(
        sys.modules,
        "torch",
        fake_module("torch", cuda=cuda, version=version, __version__="2.11.0"),
    )
    library = fake_module("exllamav2")
    monkeypatch.setitem(sys.modules, "exllamav2", library)
    with pytest.raises(NoCudaDevice) as info:
        require_library("exllamav2", "exllamav2")
    assert str(info.value) == (
        "backend 'exllamav2' needs a CUDA GPU: torch 2.11.0 (CUDA 13.0) sees no CUDA device"
    )
    assert info.value.status == 500 and info.value.code == "no_cuda_device"


def test_with_cuda_the_library_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = types.SimpleNamespace(is_available=lambda: True)
    monkeypatch.setitem(sys.modules, "torch", fake_module("torch", cuda=cuda))
    library = fake_module("exllamav3")
    monkeypatch.setitem(sys.modules, "exllamav3", library)
    assert require_library("exllamav3", "exllamav3") is library


def test_find_is_false_for_absent_or_broken_modules() -> None:
    assert not runtime._find("no_such_module_for_the_gateway_tests")
    assert runtime._find("json")


def test_load_progress_logs_every_ten_percent(caplog: pytest.LogCaptureFixture) -> None:
    progress = LoadProgress("tiny")
    with caplog.at_level(logging.INFO, logger="backends.exllama"):
        for done in range(0, 41):
            progress(done, 40)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11
    assert lines[0].startswith("loading tiny: 0/40 modules (0%")
    assert lines[-1].startswith("loading tiny: 40/40 modules (100%")
    progress(1, 0)  # a library reporting no total is ignored
