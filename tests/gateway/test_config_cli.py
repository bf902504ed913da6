"""Config validation with key paths, and the CLI commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import load_config, parse_config
from gateway.errors import ConfigError

runner = CliRunner()

GOOD = """
[server]
port = 8123

[models.small]
backend = "scripted"
aliases = ["tiny"]
[models.small.batching]
max_concurrent = 2
max_queue = 3
"""

BAD = """
[server]
port = "eighty"
colour = "blue"

[models.a]
backend = "scripted"
aliases = ["b"]
[models.a.batching]
max_concurrent = 0

[models.b]
backend = "nonexistent"

[models.c]
backend = "scripted"
token_delay_s = -1

[plugins.nope]
"""


def test_good_config_parses(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.server.port == 8123
    assert cfg.models["small"].batching.max_concurrent == 2
    assert cfg.models["small"].aliases == ("tiny",)


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text
    for expected in (
        "server.port",
        "server.colour",
        "models.a.batching.max_concurrent",
        "models.b.backend: unknown backend 'nonexistent'",
        "models.c.token_delay_s",
        "plugins.nope: unknown plugin 'nope'",
    ):
        assert expected in text, expected


def test_alias_clash_is_reported() -> None:
    raw = {
        "models": {
            "a": {"backend": "scripted", "aliases": ["x"]},
            "b": {"backend": "scripted", "aliases": ["x"]},
        }
    }
    with pytest.raises(ConfigError, match=r"models\.b\.aliases"):
        parse_config(raw, "<t>")


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.toml"
    bad.write_text("[models\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "missing.toml")


def test_no_models_is_an_error() -> None:
    with pytest.raises(ConfigError, match="at least one model"):
        parse_config({}, "<t>")


def test_cli_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    result = runner.invoke(app, ["check-config", str(good)])
    assert result.exit_code == 0 and "OK" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    result = runner.invoke(app, ["check-config", str(bad)])
    assert result.exit_code == 2
    assert "models.a.batching.max_concurrent" in result.output


def test_cli_models(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    result = runner.invoke(app, ["models", "--config", str(good)])
    assert result.exit_code == 0
    assert "small" in result.output and "tiny" in result.output


@pytest.mark.parametrize("command", [[], ["serve"], ["models"], ["check-config"]])
def test_help_reads_well(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output
