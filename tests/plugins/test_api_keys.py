"""API keys over real HTTP: every way a key can be missing or wrong, and model permissions."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.services import build_services
from gateway.testing import ServerThread
from tests.plugins.helpers import chat, client, config, post, scripted, sha256

ALICE = "sk-alice-0123456789abcdef"  # configured by hash
BOB = "sk-bob-fedcba9876543210"  # read from an environment variable
CAROL = "sk-carol-5555555555555555"  # read from a file
ENV = "GATEWAY_TEST_BOB_KEY"


def keys_table(tmp_path: Path) -> dict[str, object]:
    key_file = tmp_path / "carol.key"
    key_file.write_text(CAROL + "\n")
    return {
        "keys": [
            {"name": "alice", "sha256": sha256(ALICE)},
            {"name": "bob", "env": ENV, "models": ["small"]},
            {"name": "carol", "file": str(key_file), "models": ["big-alias"]},
        ]
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    os.environ[ENV] = BOB
    try:
        cfg = config(
            {"big": {"aliases": ["big-alias"], "reply": "a b c"}, "small": {"reply": "x y"}},
            plugins={"api_keys": keys_table(tmp_path_factory.mktemp("keys"))},
        )
    finally:
        del os.environ[ENV]
    with ServerThread(cfg) as srv:
        yield srv


def error_of(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


@pytest.mark.parametrize(("key", "model"), [(ALICE, "big"), (BOB, "small"), (CAROL, "big")])
def test_each_key_source_authenticates(server: ServerThread, key: str, model: str) -> None:
    with client(server, key) as openai_client:
        reply = openai_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.choices[0].message.content


def test_missing_key_is_401_with_an_openai_error(server: ServerThread) -> None:
    r = post(server, chat("big"))
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    err = error_of(r)
    assert err["type"] == "authentication_error"
    assert err["code"] == "missing_api_key"


def test_wrong_key_is_401_through_the_sdk(server: ServerThread) -> None:
    with client(server, "sk-not-a-key") as c, pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model="big", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    "header", ["Basic YWxpY2U6c2VjcmV0", "Bearer", f"Bearer: {ALICE}", ALICE, f"Token {ALICE}"]
)
def test_malformed_authorization_headers_are_401(server: ServerThread, header: str) -> None:
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json=chat("big"),
        headers={"Authorization": header},
    )
    assert r.status_code == 401


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_streams_are_refused_before_the_first_byte(server: ServerThread, key: str | None) -> None:
    backend = scripted(server, "big")
    started = len(backend.record.started)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        json=chat("big", stream=True),
        headers=headers,
    ) as r:
        assert r.status_code == 401
        assert not r.headers["content-type"].startswith("text/event-stream")
        body = r.read()
    assert b"data:" not in body
    assert len(backend.record.started) == started  # the engine never saw it


def test_bearer_scheme_is_case_insensitive(server: ServerThread) -> None:
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json=chat("big"),
        headers={"Authorization": f"bearer {ALICE}"},
    )
    assert r.status_code == 200


def test_model_outside_the_keys_list_is_403(server: ServerThread) -> None:
    r = post(server, chat("big"), key=BOB)
    assert r.status_code == 403
    err = error_of(r)
    assert err["type"] == "permission_error"
    assert err["param"] == "model"
    assert "bob" in str(err["message"])
    with client(server, BOB) as c, pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="big-alias", messages=[{"role": "user", "content": "hi"}])


def test_allowed_model_by_name_or_alias(server: ServerThread) -> None:
    # carol's list names the alias: the model is allowed under every name
    for model in ("big", "big-alias"):
        assert post(server, chat(model), key=CAROL).status_code == 200
    assert post(server, chat("small"), key=CAROL).status_code == 403


def test_unknown_model_is_still_404_for_a_valid_key(server: ServerThread) -> None:
    assert post(server, chat("nope"), key=ALICE).status_code == 404


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/big"])
@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_model_list_needs_a_key(server: ServerThread, path: str, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(server.base_url + path, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert error_of(r)["type"] == "authentication_error"


def test_model_list_shows_what_the_key_may_use(server: ServerThread) -> None:
    def listed(key: str) -> set[str]:
        with client(server, key) as c:
            return {m.id for m in c.models.list()}

    assert listed(ALICE) == {"big", "big-alias", "small"}  # no list: every model
    assert listed(BOB) == {"small"}
    assert listed(CAROL) == {"big", "big-alias"}  # the alias allows the model by every name
    with client(server, BOB) as c:
        assert c.models.retrieve("small").id == "small"
        with pytest.raises(openai.PermissionDeniedError):
            c.models.retrieve("big")
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("nope")


def test_keys_never_reach_logs_or_errors(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "sk-wrong-but-secret-looking-0000"
    with caplog.at_level(logging.DEBUG):
        responses = [
            post(server, chat("big"), key=wrong),
            post(server, chat("big"), key=BOB),
            post(server, chat("big"), key=ALICE),
            post(server, chat("nope"), key=CAROL),
        ]
    assert [r.status_code for r in responses] == [401, 403, 200, 404]
    text = caplog.text + "".join(r.text for r in responses)
    for secret in (wrong, ALICE, BOB, CAROL, sha256(ALICE)):
        assert secret not in text


def test_config_needs_exactly_one_secret_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, BOB)
    for key in (
        {"name": "x"},
        {"name": "x", "sha256": sha256(ALICE), "env": ENV},
    ):
        with pytest.raises(ConfigError, match=r"plugins\.api_keys\.keys\.0.*exactly one"):
            config(plugins={"api_keys": {"keys": [key]}})


def test_config_errors_name_the_source_not_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config(
            plugins={
                "api_keys": {
                    "keys": [
                        {"name": "a", "env": "GATEWAY_TEST_UNSET_VARIABLE"},
                        {"name": "b", "file": str(tmp_path / "missing.key")},
                        {"name": "c", "sha256": ALICE},  # a plain key where the hash belongs
                        {"name": "bad name!", "sha256": sha256(BOB)},
                    ]
                }
            }
        )
    message = str(info.value)
    assert "GATEWAY_TEST_UNSET_VARIABLE" in message
    assert "missing.key" in message
    assert "keys.2.sha256" in message
    assert "keys.3.name" in message
    assert ALICE not in message


def test_duplicate_names_and_secrets_are_rejected() -> None:
    with pytest.raises(ConfigError, match="unique"):
        config(
            plugins={
                "api_keys": {
                    "keys": [
                        {"name": "a", "sha256": sha256(ALICE)},
                        {"name": "a", "sha256": sha256(BOB)},
                    ]
                }
            }
        )
    with pytest.raises(ConfigError, match="same secret"):
        config(
            plugins={
                "api_keys": {
                    "keys": [
                        {"name": "a", "sha256": sha256(ALICE)},
                        {"name": "b", "sha256": sha256(ALICE).upper()},
                    ]
                }
            }
        )


def test_unknown_model_in_a_keys_list_fails_at_startup() -> None:
    cfg = config(
        plugins={"api_keys": {"keys": [{"name": "a", "sha256": sha256(ALICE), "models": ["zz"]}]}}
    )
    with pytest.raises(ConfigError, match=r"keys\.0\.models: unknown model 'zz'"):
        build_services(cfg)


def test_only_admin_keys_reach_admin_routes(tmp_path: Path) -> None:
    admin = "sk-admin-99999999999999"
    keys = [
        {"name": "alice", "sha256": sha256(ALICE)},
        {"name": "ops", "sha256": sha256(admin), "admin": True},
    ]
    with ServerThread(config(plugins={"api_keys": {"keys": keys}})) as server:
        url = server.base_url + "/admin/models"
        assert httpx.get(url).status_code == 401  # loopback, but keys are configured
        assert httpx.get(url, headers={"Authorization": f"Bearer {ALICE}"}).status_code == 403
        assert httpx.get(url, headers={"Authorization": f"Bearer {admin}"}).status_code == 200


RELOAD_CONFIG = """
[models.big]
backend = "scripted"
aliases = ["big-alias"]

[models.small]
backend = "scripted"

[[plugins.api_keys.keys]]
name = "ops"
sha256 = "{ops}"
admin = true

[[plugins.api_keys.keys]]
name = "dave"
file = "dave.key"
models = [{dave_models}]
"""

OPS = "sk-ops-1111111111111111"
DAVE = "sk-dave-2222222222222222"


def test_reload_rotates_keys_in_place(tmp_path: Path) -> None:
    """Keys change on /admin/reload without a restart: a new secret in the key's file, a new
    key, a changed model list; a bad keys table changes nothing."""
    path = tmp_path / "config.toml"
    (tmp_path / "dave.key").write_text(DAVE)

    def write(dave_models: str, extra: str = "") -> None:
        path.write_text(RELOAD_CONFIG.format(ops=sha256(OPS), dave_models=dave_models) + extra)

    running: list[ServerThread] = []

    def status(key: str, model: str) -> int:
        return post(running[0], chat(model), key=key).status_code

    def reload() -> httpx.Response:
        return httpx.post(
            running[0].base_url + "/admin/reload", headers={"Authorization": f"Bearer {OPS}"}
        )

    write('"small"')
    with ServerThread(load_config(path)) as server:
        running.append(server)
        assert (status(DAVE, "small"), status(DAVE, "big")) == (200, 403)
        write(
            '"big-alias"',
            f'\n[[plugins.api_keys.keys]]\nname = "erin"\nsha256 = "{sha256(CAROL)}"\n',
        )
        (tmp_path / "dave.key").write_text(BOB)  # dave's secret rotated in its file
        r = reload()
        assert r.status_code == 200, r.text
        assert r.json()["plugins_reloaded"] == ["api_keys"]
        assert r.json()["restart_required"] == []
        assert status(DAVE, "big") == 401  # the old secret is refused from now on
        assert (status(BOB, "big"), status(BOB, "small")) == (200, 403)
        assert status(CAROL, "small") == 200  # a new key, all models
        with client(server, BOB) as c:
            assert {m.id for m in c.models.list()} == {"big", "big-alias"}
        write('"nope"')  # an unknown model: the whole reload is refused
        r = reload()
        assert r.status_code == 400
        assert (
            "plugins.api_keys.keys.1.models: unknown model 'nope'" in r.json()["error"]["message"]
        )
        assert (status(BOB, "big"), status(CAROL, "small")) == (200, 200)
        write('"big-alias"', "\n[plugins.metrics]\n")
        r = reload()
        assert r.status_code == 200
        assert r.json()["restart_required"] == ["plugins.metrics"]  # a new plugin: restart
        assert r.json()["plugins_reloaded"] == ["api_keys"]  # erin's table was removed
        assert status(CAROL, "small") == 401
