"""Active health probes: a GET of a cheap route on every replica, every ``interval_s``.

Probes have their own small connection pool, so long streams filling a replica's pool never
delay a probe into a false failure. The probe route must make the replica do no model work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import httpx

from backends.openai.config import HealthConfig
from backends.openai.replicas import Replica

log = logging.getLogger("backends.openai")


class HealthMonitor:
    def __init__(
        self, replicas: Sequence[Replica], config: HealthConfig, api_keys: dict[str, str]
    ) -> None:
        self.replicas = tuple(replicas)
        self.config = config
        self._api_keys = api_keys
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=2 * len(self.replicas)),
            trust_env=False,
            follow_redirects=False,
        )
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    async def probe(self, replica: Replica) -> None:
        headers = {}
        if replica.url in self._api_keys:
            headers["authorization"] = f"Bearer {self._api_keys[replica.url]}"
        try:
            response = await self.http.get(replica.url + self.config.path, headers=headers)
        except httpx.RequestError as err:
            replica.probed(False, f"{type(err).__name__} {err}".strip())
            return
        ok = response.is_success
        replica.probed(ok, "" if ok else f"GET {self.config.path} answered {response.status_code}")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self.replicas))
        self.rounds += 1

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            await self.probe_all()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replica health probes")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.http.aclose()
