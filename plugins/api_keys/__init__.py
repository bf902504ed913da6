"""API keys: several named keys, each with the models it may use and its rate limits.

Keys are configured as SHA-256 hashes, or read from an environment variable or a file at
startup (only their hash is kept). A request presents its key as ``Authorization: Bearer <key>``;
it is compared in constant time against every configured hash. The plain key never appears in a
log line or an error.
"""

from plugins.api_keys.config import ApiKeysConfig, KeyConfig
from plugins.api_keys.plugin import ApiKeysFactory, ApiKeysPlugin

factory = ApiKeysFactory()

__all__ = ["ApiKeysConfig", "ApiKeysFactory", "ApiKeysPlugin", "KeyConfig", "factory"]
