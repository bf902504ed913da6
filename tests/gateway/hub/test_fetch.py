"""Fetching from a Hub stand-in on 127.0.0.1 with the real ``huggingface_hub`` client: the
standard cache, split GGUFs, missing repo/file/quant/revision and gated repos, corrupt
downloads, offline with a warm cache, one download for concurrent fetches, a download killed
half-way and resumed, a full disk, ``gateway pull``/``models --cached``/``rm``/``plan``."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from gateway.cli import app
from gateway.hub import HubError, HubSource, NotDownloaded, parse_spec
from gateway.hub.fetch import fetch
from tests.gateway.hub.conftest import TINY_REPO, Hub, gateway_cli
from tests.gateway.hub.hub_server import hub_server
from tests.support import wait_for

pytestmark = pytest.mark.timeout(60)

SPLIT = [f"Tiny-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


def test_fetch_into_the_hf_cache(hub: Hub, tiny_files: dict[str, Path]) -> None:
    path = fetch(parse_spec(f"{TINY_REPO}:q4_k_m"))  # the tag matched without regard to case
    snapshot = hub.cache / "models--test-org--Tiny-GGUF" / "snapshots"
    assert path.parent.parent == snapshot and path.name == "Tiny-Q4_K_M.gguf"
    assert path.is_symlink() and path.read_bytes() == tiny_files["Tiny-Q4_K_M.gguf"].read_bytes()
    assert (hub.cache / "models--test-org--Tiny-GGUF" / "refs" / "main").read_text()
    assert fetch(parse_spec(f"{TINY_REPO}:Q4_K_M")) == path
    assert len(hub.gets()) == 1  # the second time from the cache


def test_split_gguf_is_fetched_whole(hub: Hub, tiny_files: dict[str, Path]) -> None:
    path = fetch(parse_spec(f"{TINY_REPO}:Q8_0"))
    assert path.name == SPLIT[0]
    for name in SPLIT:
        assert (path.parent / name).read_bytes() == tiny_files[name].read_bytes()
    assert sorted(p.rsplit("/", 1)[-1] for p in hub.gets()) == SPLIT


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("test-org/missing:Q4_0", r"^test-org/missing: no such model repo on the Hub"),
        (f"{TINY_REPO}:Q2_K", rf"^{TINY_REPO}: no GGUF for quant 'Q2_K' \(it has: "),
        (f"{TINY_REPO}/nope.gguf", rf"^{TINY_REPO}: no file 'nope.gguf' in the repo$"),
        (f"{TINY_REPO}:Q4_0@v9", rf"^{TINY_REPO}: no revision 'v9' on the Hub$"),
        ("test-org/gated:Q4_0", r"^test-org/gated is a gated repo: accept its terms .* HF_TOKEN$"),
    ],
)
def test_missing_and_gated_are_one_line_errors(hub: Hub, spec: str, message: str) -> None:
    hub.state.repos["test-org/gated"] = hub.state.repos[TINY_REPO]
    hub.state.gated.add("test-org/gated")
    with pytest.raises(HubError, match=message) as err:
        fetch(parse_spec(spec))
    assert "\n" not in str(err.value)
    assert not hub.gets()


def test_corrupt_download_is_never_kept(hub: Hub) -> None:
    hub.state.corrupt.add("Tiny-Q4_K_M.gguf")
    with pytest.raises(HubError, match=r"Tiny-Q4_K_M.gguf downloaded corrupt \(sha256 "):
        fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"))
    repo = hub.cache / "models--test-org--Tiny-GGUF"
    assert not list((repo / "blobs").iterdir())
    assert not list(repo.glob("snapshots/*/*"))
    hub.state.corrupt.clear()
    assert fetch(parse_spec(f"{TINY_REPO}:Q4_K_M")).is_file()


def test_offline_uses_a_warm_cache(hub: Hub) -> None:
    hub.offline()
    with pytest.raises(NotDownloaded, match=r"not downloaded, and HF_HUB_OFFLINE is set"):
        fetch(parse_spec(f"{TINY_REPO}:Q8_0"))
    hub.offline(False)
    path = fetch(parse_spec(f"{TINY_REPO}:Q8_0"))
    hub.offline()
    requests = len(hub.state.log)
    assert fetch(parse_spec(f"{TINY_REPO}:q8_0")) == path
    assert len(hub.state.log) == requests  # not one request


def test_hub_unreachable_falls_back_to_the_cache(hub: Hub, tmp_path: Path) -> None:
    path = fetch(parse_spec(f"{TINY_REPO}:Q4_0"))
    from huggingface_hub import constants

    dead = "http://127.0.0.1:9"
    hub.monkeypatch.setattr(constants, "ENDPOINT", dead)
    assert fetch(parse_spec(f"{TINY_REPO}:Q4_0")) == path
    with pytest.raises(NotDownloaded, match=r"Tiny-GGUF:Q8_0: not downloaded, and .*cannot be"):
        fetch(parse_spec(f"{TINY_REPO}:Q8_0"))


def test_concurrent_fetches_download_once(hub: Hub) -> None:
    hub.state.rate = 2 << 20  # ~0.25 s for the file: the fetches overlap
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(hub.state.downloads("Tiny-Q4_K_M.gguf")) == 1


def _pull(
    hub: Hub, spec: str, preexec_fn: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gateway_cli(), "pull", spec], env=hub.env(), capture_output=True, text=True,
        timeout=60, preexec_fn=preexec_fn,
    )  # fmt: skip


def test_pull_killed_half_way_resumes(hub: Hub, tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB chunks: a file of a few chunks, served at ~3 s
    big = tmp_path / "Big-Q4_0.gguf"
    big.write_bytes(os.urandom(24 << 20))
    hub.state.add_repo("test-org/Big-GGUF", {big.name: big})
    hub.state.rate = 8 << 20
    proc = subprocess.Popen(
        [*gateway_cli(), "pull", "test-org/Big-GGUF:Q4_0"], env=hub.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    blobs = hub.cache / "models--test-org--Big-GGUF" / "blobs"

    def partial() -> int:
        found = list(blobs.glob("*.incomplete")) if blobs.is_dir() else []
        return found[0].stat().st_size if found else 0

    try:
        wait_for(lambda: partial() >= 10 << 20, 30, "10 MiB of the file downloaded")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    had = partial()
    assert 0 < had < big.stat().st_size
    hub.state.rate = 0
    done = _pull(hub, "test-org/Big-GGUF:Q4_0")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.read_bytes() == big.read_bytes()
    ranges = hub.state.downloads(big.name)
    assert ranges[0] is None and ranges[-1] == f"bytes={had}-"  # only the rest


def _small_file_limit(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_disk_is_a_one_line_error_and_resumes(hub: Hub, tiny_files: dict[str, Path]) -> None:
    size = tiny_files["Tiny-Q4_K_M.gguf"].stat().st_size
    full = _pull(hub, f"{TINY_REPO}:Q4_K_M", preexec_fn=lambda: _small_file_limit(size // 2))
    assert full.returncode == 1
    error = full.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {TINY_REPO}:Q4_K_M: writing Tiny-Q4_K_M.gguf failed: ")
    assert "File too large" in error and "partial file is kept" in error
    repo = hub.cache / "models--test-org--Tiny-GGUF"
    assert not list(repo.glob("snapshots/*/*"))
    assert [p.suffix for p in (repo / "blobs").iterdir()] == [".incomplete"]
    done = _cli("pull", f"{TINY_REPO}:Q4_K_M")
    assert done.exit_code == 0, done.output
    assert Path(done.stdout.strip().splitlines()[-1]).stat().st_size == size


def test_not_enough_free_space_is_refused_before_download(hub: Hub) -> None:
    import shutil

    usage = shutil.disk_usage(hub.home.parent)
    hub.monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1 << 20))
    with pytest.raises(
        HubError, match=r"Tiny-Q4_K_M.gguf: not enough disk space in .*1048576 free"
    ):
        fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"))
    assert not hub.gets()


def _cli(*args: str) -> Result:
    """``gateway ARGS`` in this process (typer's CliRunner), on the fixture's Hub and cache."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_cli_pull_models_rm(hub: Hub) -> None:
    pulled = _cli("pull", f"{TINY_REPO}:q8_0")
    assert pulled.exit_code == 0, pulled.output
    assert pulled.stdout.strip().splitlines()[-1].endswith(SPLIT[0])
    assert "vision projector, mmproj-Tiny-F16.gguf" in pulled.stderr
    assert _cli("pull", f"{TINY_REPO}:Q4_K_M").exit_code == 0

    listed = _cli("models", "--cached").stdout
    assert listed.startswith(f"{TINY_REPO}\t") and "(main)" in listed
    assert all(f"  {name}" in listed for name in [*SPLIT, "Tiny-Q4_K_M.gguf"])
    removed = _cli("rm", f"{TINY_REPO}:Q8_0")
    assert removed.exit_code == 0 and removed.stdout.startswith(f"removed {TINY_REPO}:Q8_0: ")
    listed = _cli("models", "--cached").stdout
    assert "Tiny-Q4_K_M.gguf" in listed and SPLIT[0] not in listed
    assert _cli("rm", TINY_REPO).exit_code == 0
    assert _cli("models", "--cached").stdout.startswith("no models in the Hugging Face cache")
    missing = _cli("rm", TINY_REPO)
    assert missing.exit_code == 1 and "is not in the Hugging Face cache" in missing.stderr
    bad = _cli("pull", "test-org/missing:Q4_0")
    assert bad.exit_code == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: test-org/missing: no such model repo on the Hub (a private one needs HF_TOKEN)"
    )


def test_plan_and_check_config_before_download(hub: Hub, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[models.tiny]\nbackend = "llamacpp"\nhf = "{TINY_REPO}"\nquant = "Q4_K_M"\n'
    )
    hub.offline()
    checked = _cli("check-config", str(config))
    assert checked.exit_code == 0 and "OK (1 model(s)" in checked.stdout
    hub.offline(False)
    online = _cli("plan", str(config), "--gpu", "24GB")
    assert "not downloaded (0.5 MiB of weights on the Hub: Tiny-Q4_K_M.gguf)" in " ".join(
        online.stdout.split()
    )
    hub.offline()
    offline = _cli("plan", str(config), "--gpu", "24GB")
    assert "not downloaded (offline" in offline.stdout
    assert not hub.gets()  # nothing was downloaded
    hub.offline(False)
    assert _cli("pull", f"{TINY_REPO}:Q4_K_M").exit_code == 0
    hub.offline()
    fetched = _cli("plan", str(config), "--gpu", "24GB")
    assert fetched.exit_code == 0 and "not downloaded" not in fetched.stdout, fetched.stdout


def test_the_token_is_not_sent_to_a_cdn(hub: Hub, tiny_files: dict[str, Path]) -> None:
    """File bodies redirected to another host (the Hub's LFS CDN) are fetched without HF_TOKEN,
    as ``huggingface_hub``'s own download does; the Hub itself gets it."""
    hub.monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    hub.state.gated.add(TINY_REPO)  # the Hub answers only with the token
    with hub_server(hub.state, cdn=True) as cdn:
        hub.state.cdn_url = cdn
        path = fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"))
    assert path.read_bytes() == tiny_files["Tiny-Q4_K_M.gguf"].read_bytes()
    assert hub.state.cdn_headers  # the body came from the CDN
    assert all("authorization" not in h for h in hub.state.cdn_headers)
    assert not any("hf_secret_token" in v for h in hub.state.cdn_headers for v in h.values())


def test_a_branch_that_moves_mid_fetch(hub: Hub, tiny_files: dict[str, Path]) -> None:
    """``main`` moves to a new commit between the resolve and the download: the files are the
    resolved commit's, in its snapshot, and ``refs/main`` names that commit."""
    import gateway.hub.fetch as fetching

    real_resolve = fetching.resolve
    before = hub.state.commit(TINY_REPO)

    def resolve_then_push(source: HubSource) -> fetching.Resolved:
        resolved = real_resolve(source)
        hub.state.add_repo(TINY_REPO, {**tiny_files, "NEW.md": tiny_files["README.md"]})
        return resolved

    hub.monkeypatch.setattr(fetching, "resolve", resolve_then_push)
    path = fetch(parse_spec(f"{TINY_REPO}:Q4_K_M"))
    assert path.parent.name == before and path.is_file()
    assert path.read_bytes() == tiny_files["Tiny-Q4_K_M.gguf"].read_bytes()
    repo = hub.cache / "models--test-org--Tiny-GGUF"
    assert (repo / "refs" / "main").read_text() == before
    assert [p.name for p in (repo / "snapshots").iterdir()] == [before]
    hub.offline()
    assert fetch(parse_spec(f"{TINY_REPO}:Q4_K_M")) == path  # the cache agrees
