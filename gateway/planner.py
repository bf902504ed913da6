"""``gateway plan``: each model's memory (weights, KV cache, compute) against the GPUs.

The numbers are the backends' estimates from their files' headers (nothing is loaded). The
GPUs are the ones ``nvidia-smi`` lists, or a target such as ``H100-80GB`` / ``2xL4``; without
either the models are planned on the host. A fixed reserve per GPU stands for what the CUDA
runtime takes besides the model's buffers (context, cuBLAS workspace).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.backend import EstimatesMemory, MemoryEstimate, MemoryOption, backend_factory
from gateway.config import GatewayConfig, ModelConfig
from gateway.hub.plan import planned_config
from gateway.lifecycle import format_bytes

GiB = 1 << 30
MiB = 1 << 20

#: memory.total as nvidia-smi reports it, by the names people write.
KNOWN_GPUS: dict[str, int] = {
    "H100-80GB": 81559 * MiB,
    "H100-94GB": 95830 * MiB,
    "H200-141GB": 143771 * MiB,
    "GH200-96GB": 97871 * MiB,
    "A100-80GB": 81920 * MiB,
    "A100-40GB": 40960 * MiB,
    "L40S-48GB": 46068 * MiB,
    "L4-24GB": 23034 * MiB,
    "A10-24GB": 23028 * MiB,
    "T4-16GB": 15360 * MiB,
    "V100-32GB": 32768 * MiB,
    "V100-16GB": 16384 * MiB,
    "A6000-48GB": 49140 * MiB,
    "RTX4090-24GB": 24564 * MiB,
    "RTX3090-24GB": 24576 * MiB,
}
_SPEC = re.compile(
    r"^(?:(?P<count>\d+)\s*x\s*)?(?P<name>[A-Za-z][A-Za-z0-9]*)?-?"
    r"(?:(?P<size>\d+(?:\.\d+)?)\s*(?:GB|GiB|G))?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Device:
    name: str
    total_bytes: int
    #: In use by others now (nvidia-smi), if known.
    used_bytes: int = 0


def parse_gpu_target(spec: str) -> list[Device]:
    """``H100-80GB``, ``H100`` (its largest), ``2xA100-40GB``, ``24GB``: the devices it names."""
    m = _SPEC.match(spec.strip())
    if m is None or not (m["name"] or m["size"]):
        raise ValueError(f"GPU target {spec!r}: write it like H100-80GB, 2xL4 or 24GB")
    count = int(m["count"] or 1)
    name, size = (m["name"] or "").upper(), m["size"]
    if not 1 <= count <= 64:
        raise ValueError(f"GPU target {spec!r}: 1 to 64 devices")
    matches = {k: v for k, v in KNOWN_GPUS.items() if k.split("-")[0] == name}
    if size is not None:
        wanted = float(size)
        exact = {k: v for k, v in matches.items() if float(k.split("-")[1][:-2]) == wanted}
        total = next(iter(exact.values()), round(wanted * GiB))
        label = next(iter(exact), f"{name or 'GPU'}-{size}GB")
    elif matches:
        label, total = max(matches.items(), key=lambda kv: kv[1])
    else:
        known = ", ".join(sorted({k.split("-")[0] for k in KNOWN_GPUS}))
        raise ValueError(
            f"GPU target {spec!r}: unknown GPU; give its size (e.g. {name}-24GB) or one of {known}"
        )
    return [Device(label, total) for _ in range(count)]


def detect_gpus() -> list[Device]:
    """The GPUs ``nvidia-smi`` lists (none if it is absent or fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "--query-gpu=name,memory.total,memory.used"
    try:
        out = subprocess.run(
            [exe, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    devices = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit():
            used = int(parts[2]) if parts[2].isdigit() else 0
            devices.append(Device(parts[0], int(parts[1]) * MiB, used * MiB))
    return devices


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> Device:
    """Host RAM (``MemTotal``; what others use: ``MemTotal - MemAvailable``)."""
    values: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return Device("host", 0)
    total = values.get("MemTotal", 0)
    return Device("host", total, total - values.get("MemAvailable", total))


@dataclass
class ModelPlan:
    name: str
    config: ModelConfig
    estimate: MemoryEstimate | None = None
    problem: str | None = None
    #: Per place that is short ("GPU 0", "host"): bytes missing.
    short: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.estimate is not None and not self.short


@dataclass
class Plan:
    gpus: list[Device]
    host: Device
    reserve_bytes: int
    models: list[ModelPlan]

    def usable_gpu(self, device: int) -> int:
        return max(0, self.gpus[device].total_bytes - self.reserve_bytes)

    @property
    def all_fit(self) -> bool:
        return all(m.fits for m in self.models)

    def together(self) -> dict[str, tuple[int, int]]:
        """Per place: (bytes all estimated models need together, bytes usable)."""
        prints = [m.estimate for m in self.models if m.estimate is not None]
        places = {
            f"GPU {d}": (sum(_on(e, d) for e in prints), self.usable_gpu(d))
            for d in range(len(self.gpus))
        }
        places["host"] = (sum(e.host_bytes for e in prints), self.host.total_bytes)
        return places


def _on(estimate: MemoryEstimate, device: int) -> int:
    return estimate.gpu_bytes[device] if device < len(estimate.gpu_bytes) else 0


def make_plan(config: GatewayConfig, gpus: Sequence[Device], reserve_bytes: int) -> Plan:
    plan = Plan(list(gpus), host_memory(), reserve_bytes, [])
    for name, model in config.models.items():
        item = ModelPlan(name, model)
        factory = backend_factory(model.backend)
        if not isinstance(factory, EstimatesMemory):
            item.problem = f"backend {model.backend!r} gives no memory estimate"
        else:
            try:  # a Hub model: estimated from its cached files, else "not downloaded"
                item.estimate = factory.memory_estimate(planned_config(model), len(gpus))
            except (OSError, ValueError) as err:
                item.problem = f"no estimate: {err}"
        if item.estimate is not None:
            for d in range(len(gpus)):
                missing = _on(item.estimate, d) - plan.usable_gpu(d)
                if missing > 0:
                    item.short[f"GPU {d}"] = missing
            if plan.host.total_bytes and item.estimate.host_bytes > plan.host.total_bytes:
                item.short["host"] = item.estimate.host_bytes - plan.host.total_bytes
        plan.models.append(item)
    return plan


def render(plan: Plan, config: GatewayConfig, console: Console) -> None:
    gpus = [f"GPU {i}: {d.name} {format_bytes(d.total_bytes)}" for i, d in enumerate(plan.gpus)]
    target = ", ".join(gpus) or "no GPU: every model planned on the host"
    console.print(f"[bold]Devices[/bold]: {target}; host RAM {format_bytes(plan.host.total_bytes)}")
    if plan.gpus:
        console.print(f"Reserved per GPU for the CUDA runtime: {format_bytes(plan.reserve_bytes)}")
    table = Table()
    table.add_column("model")
    table.add_column("backend")
    for column in ("weights", "KV cache", "compute", "total"):
        table.add_column(column, justify="right")
    for d in range(len(plan.gpus)):
        table.add_column(f"GPU {d}", justify="right")
    table.add_column("host", justify="right")
    table.add_column("fits")
    for m in plan.models:
        table.add_row(*_row(m, plan))
    console.print(table)
    for m in plan.models:
        if m.estimate is not None and m.estimate.kv_cache_shape:
            console.print(escape(f"{m.name}: KV cache {m.estimate.kv_cache_shape}"))
        if m.problem is not None:
            console.print(f"{escape(m.name)}: [yellow]{escape(m.problem)}[/yellow]")
    for m in plan.models:
        if m.estimate is not None and m.short:
            _advise(m, console)
    _summary(plan, config, console)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _row(m: ModelPlan, plan: Plan) -> list[str]:
    e = m.estimate
    if e is None:
        blanks = ["-"] * (5 + len(plan.gpus))
        return [escape(m.name), m.config.backend, *blanks, "[yellow]?[/yellow]"]
    verdict = "[green]yes[/green]" if m.fits else "[red]no[/red]"
    gpus = [_size(_on(e, d)) for d in range(len(plan.gpus))]
    sizes = (e.weights_bytes, e.kv_cache_bytes, e.compute_bytes, e.total_bytes)
    sizes_text = map(_size, sizes)
    return [escape(m.name), m.config.backend, *sizes_text, *gpus, _size(e.host_bytes), verdict]


def _advise(m: ModelPlan, console: Console) -> None:
    assert m.estimate is not None
    need = max(m.short.values())
    where = ", ".join(f"{format_bytes(b)} on {p}" for p, b in m.short.items())
    console.print(f"\n[bold]{escape(m.name)}[/bold] does not fit: {where} short. To change:")
    options: list[MemoryOption] = sorted(m.estimate.options, key=lambda o: -o.saves_bytes)
    for o in options:
        enough = " [green](enough alone)[/green]" if o.saves_bytes >= need else ""
        change = f"  models.{m.name}.{o.setting} = {o.value}: saves {format_bytes(o.saves_bytes)}"
        console.print(escape(change) + enough)
    if sum(o.saves_bytes for o in options) < need:
        console.print(
            "  even all of these together are not enough: a smaller quantization "
            "of the weights, or more (or larger) GPUs"
        )


def _summary(plan: Plan, config: GatewayConfig, console: Console) -> None:
    console.print()
    fitting = sum(m.fits for m in plan.models)
    console.print(f"{fitting} of {len(plan.models)} model(s) fit on their own.")
    crowded = []
    for place, (need, usable) in plan.together().items():
        if need and usable:
            state = "fit" if need <= usable else "do not fit"
            console.print(
                f"All together on {place}: {format_bytes(need)} of {format_bytes(usable)} "
                f"usable: they {state} at once."
            )
            if need > usable:
                crowded.append(place)
    budget = config.lifecycle
    for d, limit in enumerate(budget.gpu_memory_bytes[: len(plan.gpus)]):
        if limit > plan.usable_gpu(d):
            console.print(
                f"[yellow]lifecycle.gpu_memory_bytes[{d}] = {limit} is more than GPU {d} has "
                f"usable ({plan.usable_gpu(d)})[/yellow]"
            )
    if crowded and not (budget.gpu_memory_bytes or budget.host_memory_bytes):
        lines = [escape("[lifecycle]")]
        if plan.gpus:
            sizes = ", ".join(str(plan.usable_gpu(d)) for d in range(len(plan.gpus)))
            lines.append(f"gpu_memory_bytes = [{sizes}]")
        else:
            lines.append(f"host_memory_bytes = {plan.host.total_bytes * 9 // 10}")
        console.print(
            "Not all models can stay loaded at once: give the gateway a budget, and it loads "
            "them on demand and evicts the least recently used:\n  " + "\n  ".join(lines)
        )
