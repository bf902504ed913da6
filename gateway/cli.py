"""The ``gateway`` command: serve, list models, check a config."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

app = typer.Typer(
    help="An OpenAI-compatible gateway for GPU inference with plugin backends.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="config.toml to use. Without it the embedded default model is served "
        "(no file is read implicitly).",
        exists=False,
        dir_okay=False,
    ),
]


def _load(config: Path | None) -> GatewayConfig:
    from gateway.defaults import default_config

    try:
        return load_config(config) if config is not None else default_config()
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default: [server].host).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default: [server].port).")] = None,
) -> None:
    """Start the server (one process; the engines live in it)."""
    from gateway.server import run_server

    cfg = _load(config)
    code = asyncio.run(run_server(cfg, host=host, port=port))
    raise typer.Exit(code)


@app.command()
def models(config: ConfigOption = None) -> None:
    """List the configured models, their backends and aliases."""
    cfg = _load(config)
    for name, model in cfg.models.items():
        aliases = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
        typer.echo(f"{name}\tbackend={model.backend}\tload={model.load}{aliases}")


@app.command("check-config")
def check_config(
    path: Annotated[Path, typer.Argument(help="The config.toml to validate.")],
) -> None:
    """Validate a config file; print every problem with its key path."""
    cfg = _load(path)
    typer.echo(f"{path}: OK ({len(cfg.models)} model(s), {len(cfg.plugins)} plugin(s))")


@app.command()
def plan(
    path: Annotated[
        Path | None,
        typer.Argument(help="The config.toml to plan (default: the embedded default model)."),
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            help="Plan for this GPU instead of the ones nvidia-smi finds: H100-80GB, 2xL4, 24GB."
        ),
    ] = None,
    reserve_gib: Annotated[
        float, typer.Option(help="GiB per GPU kept for the CUDA runtime.", min=0)
    ] = 1.0,
) -> None:
    """Estimate each model's memory (weights, KV cache, compute) against the GPUs.

    Exits 1 if a model does not fit on its own.
    """
    from rich.console import Console

    from gateway.planner import detect_gpus, make_plan, parse_gpu_target, render

    cfg = _load(path)
    try:
        gpus = parse_gpu_target(gpu) if gpu else detect_gpus()
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    result = make_plan(cfg, gpus, int(reserve_gib * (1 << 30)))
    render(result, cfg, Console(width=None if sys.stdout.isatty() else 160))
    raise typer.Exit(0 if result.all_fit else 1)


def main() -> None:
    app()
