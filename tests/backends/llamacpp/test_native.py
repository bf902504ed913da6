"""How llama.cpp's CPU threads wait: the gateway's OpenMP defaults reach libgomp (which prints
what it read at load time with ``OMP_DISPLAY_ENV=VERBOSE``), and an operator's setting wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_LOAD = "from backends.llamacpp.native import load_llama_cpp; load_llama_cpp()"
#: libgomp loaded (and so its environment read) before llama.cpp is
_LOAD_AFTER_LIBGOMP = "import ctypes; ctypes.CDLL('libgomp.so.1'); " + _LOAD


def _libgomp_settings(load: str = _LOAD, **env: str) -> str:
    """What libgomp displayed when llama.cpp was loaded in a fresh process with ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", load],
        env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "OPENMP DISPLAY ENVIRONMENT BEGIN" in out.stderr, out.stderr[-2000:]
    return out.stderr


@pytest.mark.timeout(90)
def test_llama_cpp_threads_spin_briefly_by_default() -> None:
    shown = _libgomp_settings()
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in shown
    assert "GOMP_SPINCOUNT = '10000'" in shown


@pytest.mark.timeout(90)
def test_an_operator_wait_policy_is_kept() -> None:
    shown = _libgomp_settings(OMP_WAIT_POLICY="PASSIVE")
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown
    assert "GOMP_SPINCOUNT = '0'" in shown


@pytest.mark.timeout(90)
def test_an_operator_spin_count_is_kept() -> None:
    shown = _libgomp_settings(GOMP_SPINCOUNT="2000")
    assert "GOMP_SPINCOUNT = '2000'" in shown
    assert "OMP_WAIT_POLICY = 'ACTIVE'" not in shown


@pytest.mark.timeout(90)
def test_a_libgomp_loaded_earlier_is_left_alone_and_said() -> None:
    shown = _libgomp_settings(_LOAD_AFTER_LIBGOMP)
    assert "GOMP_SPINCOUNT = '300000'" in shown  # libgomp's own default: it had read its env
    assert "libgomp was loaded before llama.cpp" in shown
