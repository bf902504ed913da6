"""``[ray]``: how ``gateway serve --ray ADDRESS`` runs the gateway on a Ray cluster.

The models' tables are the same as on one machine: each replica of the model server is a whole
gateway with its engines; this table says how many replicas, what each holds of the cluster,
how their number follows the load, and how requests are routed between them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: How the proxy's requests are spread over the replicas: ``prefix`` keeps a conversation on
#: the replica whose KV cache holds its prefix (falling back to the least loaded);
#: ``power_of_two`` is Ray Serve's default router; ``round_robin`` takes turns.
Router = Literal["prefix", "power_of_two", "round_robin"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayAutoscaling(_Strict):
    """Replicas follow the load: about ``target_ongoing_requests`` per replica, between
    ``min_replicas`` (0: none while idle; the first request waits for one to load) and
    ``max_replicas``."""

    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    #: How often the load is measured, and over how long a window (Ray's defaults: 10 and
    #: 30 s; shorter makes a scale-up from zero start sooner).
    metrics_interval_s: float | None = Field(None, gt=0)
    look_back_period_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> RayAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be at most max_replicas")
        start = self.initial_replicas
        if start is not None and not self.min_replicas <= start <= self.max_replicas:
            raise ValueError("initial_replicas must be between min_replicas and max_replicas")
        return self


class RayConfig(_Strict):
    #: Replicas of the model server (default 1; not with ``[ray.autoscaling]``).
    num_replicas: int | None = Field(None, ge=1)
    autoscaling: RayAutoscaling | None = None
    #: What one replica holds of the cluster (one replica per GPU: ``num_gpus = 1``).
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    #: Requests one replica takes at once (its models' queues wait beyond their batch).
    max_ongoing_requests: int = Field(64, ge=1)
    router: Router = "prefix"
    #: A replica scaled down stops taking requests and lets running ones finish this long.
    graceful_shutdown_timeout_s: float = Field(120.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    #: The application's name on the cluster.
    app_name: str = Field("gateway", min_length=1)

    @model_validator(mode="after")
    def _one_way(self) -> RayConfig:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or [ray.autoscaling], not both")
        return self
