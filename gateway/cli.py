"""The ``gateway`` command: serve, list models, check a config."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.hub import HubSource

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
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Serve this one model with no config file: org/repo[:QUANT] from the Hugging "
            "Face Hub (fetched into its cache) or a .gguf file; named as given, alias 'default'.",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default: [server].host).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default: [server].port).")] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run on the Ray cluster at this address as a Ray Serve application, replicas "
            "and autoscaling from [ray] ('local': start a cluster on this machine; 'auto': the "
            "one running here). Needs llm-gateway[ray].",
        ),
    ] = None,
) -> None:
    """Start the server (one process; the engines live in it), or run it on Ray Serve."""
    if model is not None and config is not None:
        typer.echo("error: give --config or --model, not both", err=True)
        raise typer.Exit(2)
    cfg = _load(config) if model is None else _single(model)
    if ray is not None:
        from gateway.ray_serve.launch import serve_on_ray

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        server = cfg.server
        raise typer.Exit(serve_on_ray(cfg, ray, host or server.host, port or server.port))
    from gateway.server import run_server

    code = asyncio.run(run_server(cfg, host=host, port=port))
    raise typer.Exit(code)


def _single(spec: str) -> GatewayConfig:
    from gateway.defaults import single_model_config

    try:
        return single_model_config(spec)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


@app.command()
def models(
    config: ConfigOption = None,
    cached: Annotated[
        bool,
        typer.Option(
            "--cached", help="List the models in the Hugging Face cache instead, with sizes."
        ),
    ] = False,
) -> None:
    """List the configured models, their backends and aliases (or the cached Hub models)."""
    if cached:
        _list_cached()
        return
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


def _list_cached() -> None:
    from gateway.hub.cache import cached_models
    from gateway.hub.fetch import hub_cache
    from gateway.lifecycle import format_bytes

    found = cached_models()
    if not found:
        typer.echo(f"no models in the Hugging Face cache ({hub_cache()})")
    for m in found:
        refs = f" ({', '.join(m.refs)})" if m.refs else ""
        typer.echo(f"{m.repo}\t{format_bytes(m.size_bytes)}\t{m.revision[:12]}{refs}")
        for name in m.files:
            typer.echo(f"  {name}")


def _hub_source(spec: str) -> HubSource:
    from gateway.hub import HubError, parse_spec

    try:
        return parse_spec(spec)
    except HubError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def pull(
    spec: Annotated[
        str,
        typer.Argument(help="org/repo[:QUANT] (a GGUF quant tag such as Q4_K_M), org/repo/file."),
    ],
    revision: Annotated[str, typer.Option(help="Branch, tag or commit.")] = "main",
) -> None:
    """Fetch a model from the Hugging Face Hub into its cache (resumed if interrupted)."""
    from gateway.hub import DownloadProgress, HubError
    from gateway.hub.pull import pull_with_bar

    source = _hub_source(spec if revision == "main" else f"{spec}@{revision}")
    progress = DownloadProgress(source.label)
    try:
        path = pull_with_bar(source, progress)
    except KeyboardInterrupt:
        typer.echo("interrupted: `gateway pull` again resumes the download", err=True)
        raise typer.Exit(130) from None
    except HubError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(str(path))
    if progress.mmproj:
        typer.echo(
            f"note: the repo has a vision projector, {progress.mmproj} (not fetched)", err=True
        )


@app.command()
def rm(
    spec: Annotated[
        str, typer.Argument(help="org/repo (every revision) or org/repo:QUANT (those files).")
    ],
) -> None:
    """Remove a model from the Hugging Face cache."""
    from gateway.hub import HubError
    from gateway.hub.cache import remove
    from gateway.lifecycle import format_bytes

    source = _hub_source(spec)
    try:
        freed = remove(source)
    except HubError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"removed {source.label}: {format_bytes(freed)} freed")


def main() -> None:
    app()
