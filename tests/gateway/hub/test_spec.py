"""Hub sources: ``org/repo[:QUANT]``, quant tags matched without regard to case, split GGUF
groups, the projector beside a model, and the config tables that name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.llamacpp.config import LlamaCppConfig
from gateway.config import parse_config
from gateway.defaults import single_model_config
from gateway.errors import ConfigError
from gateway.hub import HubError, HubSource, parse_spec
from gateway.hub.spec import select_gguf

pytestmark = pytest.mark.timeout(30)

NAMES = [
    "README.md",
    "Model-Q4_K_M.gguf",
    "Model-Q8_0.gguf",
    "model.q5_k_s.gguf",
    "Model-F16-00001-of-00003.gguf",
    "Model-F16-00002-of-00003.gguf",
    "Model-F16-00003-of-00003.gguf",
    "mmproj-Model-F16.gguf",
    "mmproj-Model-Q8_0.gguf",
]


def test_parse_spec() -> None:
    assert parse_spec("org/repo") == HubSource("org/repo")
    assert parse_spec("org/repo:q4_k_m") == HubSource("org/repo", quant="q4_k_m")
    assert parse_spec("hf.co/org/repo:Q8_0@v2") == HubSource("org/repo", None, "Q8_0", "v2")
    assert parse_spec("org/repo/sub/m.gguf").file == "sub/m.gguf"
    assert parse_spec("org/repo:Q4_K_M").label == "org/repo:Q4_K_M"
    for bad in ("repo", "org/", "/org/repo", "org--x/r", "a/b@"):
        with pytest.raises(HubError):
            parse_spec(bad)


@pytest.mark.parametrize(
    ("quant", "files"),
    [
        ("Q4_K_M", ("Model-Q4_K_M.gguf",)),
        ("q4_k_m", ("Model-Q4_K_M.gguf",)),
        ("Q5_K_S", ("model.q5_k_s.gguf",)),
        ("f16", tuple(f"Model-F16-0000{i}-of-00003.gguf" for i in (1, 2, 3))),
        (None, ("Model-Q4_K_M.gguf",)),
    ],
)
def test_quant_picks_files(quant: str | None, files: tuple[str, ...]) -> None:
    picked = select_gguf(HubSource("org/repo", quant=quant), NAMES)
    assert picked.files == files
    assert picked.primary == files[0]
    assert picked.mmproj == "mmproj-Model-F16.gguf"


def test_missing_quant_file_and_shard_are_one_line_errors() -> None:
    with pytest.raises(HubError, match=r"org/repo: no GGUF for quant 'Q2_K' \(it has: F16, Q4_K_M"):
        select_gguf(HubSource("org/repo", quant="Q2_K"), NAMES)
    with pytest.raises(HubError, match=r"no file 'x\.gguf'"):
        select_gguf(HubSource("org/repo", file="x.gguf"), NAMES)
    with pytest.raises(HubError, match=r"shard Model-F16-00002-of-00003\.gguf is missing"):
        select_gguf(HubSource("org/repo", quant="F16"), [n for n in NAMES if "00002" not in n])
    with pytest.raises(HubError, match="has no GGUF"):
        select_gguf(HubSource("org/repo"), ["README.md"])


def _table(**keys: object) -> dict[str, object]:
    return {"models": {"m": {"backend": "llamacpp", **keys}}}


def test_config_takes_exactly_one_source(tmp_path: Path) -> None:
    cfg = parse_config(_table(hf="org/repo", quant="Q4_K_M"), "<t>").models["m"]
    assert isinstance(cfg, LlamaCppConfig)
    assert cfg.hub_source() == HubSource("org/repo", quant="Q4_K_M")
    with pytest.raises(ValueError, match="not fetched"):
        _ = cfg.model_path
    local = cfg.with_local_files(tmp_path / "m.gguf")
    assert local.model_path == tmp_path / "m.gguf" and local.hub_source() is None
    inline = parse_config(_table(hf="org/repo:q8_0"), "<t>").models["m"]
    assert isinstance(inline, LlamaCppConfig)
    assert inline.hub_source() == HubSource("org/repo", quant="q8_0")
    bad = [
        (_table(), "exactly one of model_path"),
        (_table(model_path="x.gguf", hf="org/repo"), "exactly one of model_path"),
        (_table(model_path="x.gguf", quant="Q4_0"), "go with hf"),
        (_table(hf="not a repo"), "models.m: Value error, hf: 'not a repo' is not"),
        (_table(hf="org/repo", file="a.gguf", quant="Q4_0"), "a file or a quant, not both"),
    ]
    for raw, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config(raw, "<t>")


def test_serve_model_config_names_the_model_as_given(tmp_path: Path) -> None:
    cfg = single_model_config("org/Repo-GGUF:Q4_K_M")
    (name, model) = next(iter(cfg.models.items()))
    assert name == "org/Repo-GGUF:Q4_K_M" and model.aliases == ("default",)
    assert isinstance(model, LlamaCppConfig)
    assert model.hub_source() == HubSource("org/Repo-GGUF", quant="Q4_K_M")
    assert set(cfg.plugins) == {"metrics", "chat_page"}
    assert model.kv_cache.host_cache_bytes > 0
    path = tmp_path / "m.gguf"
    local = single_model_config(str(path))
    assert local.models[str(path)].model_path == path  # type: ignore[attr-defined]


def test_revision_then_quant() -> None:
    assert parse_spec("org/repo@v1:Q4_K_M") == HubSource("org/repo", None, "Q4_K_M", "v1")
    assert parse_spec("org/repo:Q4_K_M@v1") == HubSource("org/repo", None, "Q4_K_M", "v1")
    with pytest.raises(HubError, match="two quant tags"):
        parse_spec("org/repo:Q8_0@v1:Q4_K_M")


def test_a_quant_is_matched_as_a_whole_tag() -> None:
    names = ["Model-Q4_K_M.gguf", "Model-Q5_K_M.gguf", "model_Q8_0.gguf"]
    with pytest.raises(HubError, match="no GGUF for quant 'K_M'"):
        select_gguf(HubSource("org/repo", quant="K_M"), names)
    with pytest.raises(HubError, match="no GGUF for quant '0'"):
        select_gguf(HubSource("org/repo", quant="0"), names)
    assert select_gguf(HubSource("org/repo", quant="q8_0"), names).files == ("model_Q8_0.gguf",)


def test_looks_like_hub_spec() -> None:
    from gateway.hub import looks_like_hub_spec

    assert looks_like_hub_spec("org/repo/File-Q4_K_M.gguf")
    assert looks_like_hub_spec("org/repo:Q4_K_M")
    for local in ("model.gguf", "dir/model.gguf", "./org/repo/f.gguf", "/m/f.gguf", "~/f.gguf"):
        assert not looks_like_hub_spec(local), local


def test_serve_model_hub_file_not_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = single_model_config("org/repo/File-Q4_K_M.gguf").models["org/repo/File-Q4_K_M.gguf"]
    assert isinstance(cfg, LlamaCppConfig)
    assert cfg.hub_source() == HubSource("org/repo", file="File-Q4_K_M.gguf")
    (tmp_path / "org" / "repo").mkdir(parents=True)
    (tmp_path / "org" / "repo" / "File-Q4_K_M.gguf").write_bytes(b"")
    local = single_model_config("org/repo/File-Q4_K_M.gguf").models["org/repo/File-Q4_K_M.gguf"]
    assert isinstance(local, LlamaCppConfig) and local.hub_source() is None
