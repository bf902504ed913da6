"""Checks the API key (``Authorization: Bearer <key>``, or Anthropic's ``x-api-key``) before
the body is read, and the model after."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gateway.config import GatewayConfig, PluginConfig
from gateway.errors import AuthenticationError, ConfigError, PermissionDenied
from gateway.plugins import Plugin, RateLimits, RequestContext
from gateway.pool import ModelPool
from gateway.types import ClientRequest
from plugins.api_keys.config import ApiKeysConfig, KeyConfig, hash_key

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="gateway"'}


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    digest: bytes
    #: Configured model names this key may use; None: every model.
    models: frozenset[str] | None
    limits: RateLimits
    admin: bool = False

    @property
    def cache_salt(self) -> str:
        """This key's prefix-cache partition: its name under a secret only the server has (the
        key's hash), so it is stable across restarts (the KV disk tier) and not guessable."""
        return hmac.new(self.digest, b"cache_salt\0" + self.name.encode(), "sha256").hexdigest()


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _keys(config: ApiKeysConfig, model_ids: Mapping[str, str]) -> list[Key]:
    """The keys of a config; ``model_ids`` maps every model name and alias to its name."""
    keys: list[Key] = []
    problems: list[str] = []
    for i, cfg in enumerate(config.keys):
        models = _allowed_models(cfg, model_ids, f"plugins.api_keys.keys.{i}.models", problems)
        keys.append(Key(cfg.name, cfg.digest, models, cfg.limits, cfg.admin))
    if problems:
        raise ConfigError("plugins.api_keys", problems)
    return keys


def _allowed_models(
    cfg: KeyConfig, model_ids: Mapping[str, str], where: str, problems: list[str]
) -> frozenset[str] | None:
    if not cfg.models:
        return None
    names = set()
    for model in cfg.models:
        if model in model_ids:
            names.add(model_ids[model])
        else:
            problems.append(f"{where}: unknown model {model!r}")
    return frozenset(names)


class ApiKeysPlugin(Plugin):
    def __init__(self, keys: Sequence[Key]) -> None:
        self._set_keys(keys)

    def _set_keys(self, keys: Sequence[Key]) -> None:
        self._keys = tuple(keys)
        self._by_name = {k.name: k for k in keys}

    def prepare_reconfigure(
        self, config: PluginConfig, gateway: GatewayConfig
    ) -> Callable[[], None]:
        """Keys change in place on a config reload (a new key works at once, a removed one is
        refused from the next request on); the new config's models are checked first."""
        assert isinstance(config, ApiKeysConfig)
        keys = _keys(config, gateway.model_ids())
        return lambda: self._set_keys(keys)

    def _match(self, presented: str) -> Key | None:
        """The key whose hash matches; every key is compared, each in constant time."""
        digest = hash_key(presented)
        found = None
        for key in self._keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found

    async def on_request_headers(self, ctx: RequestContext) -> None:
        presented = _bearer(ctx.headers.get("authorization")) or ctx.headers.get("x-api-key")
        if not presented:
            raise AuthenticationError(
                "Missing API key: send it in the Authorization header as 'Bearer <key>' "
                "(or in x-api-key).",
                code="missing_api_key",
                headers=_CHALLENGE,
            )
        key = self._match(presented)
        if key is None:
            raise AuthenticationError("Incorrect API key provided.", headers=_CHALLENGE)
        ctx.principal = key.name
        ctx.limits = key.limits
        ctx.admin = key.admin
        ctx.models = key.models
        ctx.cache_salt = key.cache_salt

    async def on_request(self, ctx: RequestContext, request: ClientRequest) -> None:
        key = self._by_name.get(ctx.principal or "")
        if key is None:  # another plugin replaced the principal: refuse rather than guess
            raise AuthenticationError("Incorrect API key provided.", headers=_CHALLENGE)
        if key.models is not None and ctx.model not in key.models:
            raise PermissionDenied(
                f"API key {key.name!r} may not use model {request.model!r}", param="model"
            )


class ApiKeysFactory:
    config_type = ApiKeysConfig

    def create(self, config: PluginConfig, pool: ModelPool) -> ApiKeysPlugin:
        assert isinstance(config, ApiKeysConfig)
        return ApiKeysPlugin(_keys(config, pool.config.model_ids()))
