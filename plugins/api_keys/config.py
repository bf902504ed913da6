"""``[plugins.api_keys]``: one ``[[plugins.api_keys.keys]]`` table per key."""

from __future__ import annotations

import hashlib
import os

from pydantic import Field, PrivateAttr, model_validator

from gateway.config import FilePath, PluginConfig, StrictModel
from gateway.plugins import RateLimits

#: Key names show up in logs, metrics and ``ctx.principal``: keep them plain.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyConfig(StrictModel):
    """One API key: exactly one of ``sha256``, ``env`` and ``file`` gives the secret."""

    name: str = Field(pattern=NAME_PATTERN)
    #: The hex SHA-256 of the key (``printf %s "$KEY" | sha256sum``).
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    #: An environment variable holding the key, read at startup (and on a config reload).
    env: str | None = Field(None, min_length=1)
    #: A file holding the key (surrounding whitespace ignored; a relative path is taken from the
    #: config file's folder), read at startup and on each config reload.
    file: FilePath | None = None
    #: Models (names or aliases) this key may use; empty: every model.
    models: tuple[str, ...] = ()
    #: May use ``/admin/`` (load and unload models, reload the config).
    admin: bool = False
    #: Rate limits for this key (0: unlimited; unset: the rate_limit plugin's default).
    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    concurrent_requests: int | None = Field(None, ge=0)

    _digest: bytes = PrivateAttr(b"")

    @model_validator(mode="after")
    def _resolve_secret(self) -> KeyConfig:
        given = [s for s in (self.sha256, self.env, self.file) if s is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'sha256', 'env' and 'file'")
        self._digest = self._read_digest()
        return self

    def _read_digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        if self.env is not None:
            secret = os.environ.get(self.env, "").strip()
            if not secret:
                raise ValueError(f"environment variable {self.env!r} is not set or empty")
            return hash_key(secret)
        assert self.file is not None
        try:
            secret = self.file.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ValueError(f"cannot read key file {str(self.file)!r}: {err.strerror}") from None
        if not secret:
            raise ValueError(f"key file {str(self.file)!r} is empty")
        return hash_key(secret)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the key: the only form of it the gateway keeps."""
        return self._digest

    @property
    def limits(self) -> RateLimits:
        return RateLimits(
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            concurrent_requests=self.concurrent_requests,
        )


class ApiKeysConfig(PluginConfig):
    keys: tuple[KeyConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ApiKeysConfig:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("key names must be unique")
        if len({k.digest for k in self.keys}) != len(self.keys):
            raise ValueError("two keys have the same secret")
        return self
