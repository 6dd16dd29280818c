"""`capibara6 serve|models`. Flags are generated from `ServerSettings`, so file, env and CLI agree."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import uvicorn

from . import crash, shutdown
from .api.app import AppState, create_app, wrap
from .config import (
    DEFAULT_PORTS,
    ROLES,
    ConfigError,
    Registry,
    ServerSettings,
    build_settings,
    load_registry,
    parse_ports,
)
from .logs import setup_logging
from .shutdown import Drain
from .threads import resolve_threads

log = logging.getLogger("capibara6")

_SKIP = {"config", "ports", "roles"}  # flags with their own syntax below


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    for name, field in ServerSettings.model_fields.items():
        if name in _SKIP:
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        elif name == "cors_origins":
            p.add_argument(flag, default=None, help=(field.description or "") + " (comma-separated)")
        else:
            p.add_argument(flag, default=None, help=field.description)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capibara6", description="OpenAI-compatible LLM server for ARM CPUs")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (all three roles in one process by default)")
    serve.add_argument("--config", default=None, help="model registry (default: models.yaml)")
    serve.add_argument("--ports", default=None, help="8082,8083,8084 or standard=8082,... (role order)")
    serve.add_argument("--role", choices=ROLES, default=None, help="serve one role only")
    serve.add_argument("--port", type=int, default=None, help="port for --role")
    _add_settings_flags(serve)
    models = sub.add_parser("models", help="print the registry and, from a running server, each model's state")
    models.add_argument("--config", default=None)
    models.add_argument("--url", default="http://127.0.0.1:8082", help="a running server to ask for states")
    from .bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="serving benchmark of an OpenAI-compatible URL, or --compare results"))
    from .doctor import add_arguments as add_doctor_arguments

    add_doctor_arguments(sub.add_parser("doctor", help="check this machine: CPU, builds, a smoke generation per model"))
    return parser


def settings_from_args(args: argparse.Namespace, registry_server: dict[str, Any]) -> ServerSettings:
    cli: dict[str, Any] = {name: getattr(args, name, None) for name in ServerSettings.model_fields if name not in _SKIP}
    if isinstance(cli.get("cors_origins"), str):
        cli["cors_origins"] = [x for x in cli["cors_origins"].split(",") if x]
    if args.config:
        cli["config"] = args.config
    if args.role:
        cli["roles"] = [args.role]
        cli["ports"] = {args.role: args.port or DEFAULT_PORTS[args.role]}
    elif args.ports:
        cli["ports"] = {**DEFAULT_PORTS, **parse_ports(args.ports)}
    return build_settings(registry_server, cli)


class _Server(uvicorn.Server):
    """Several servers share one loop, so signals are handled once, by us, for all of them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_servers(state: AppState, on_started: Any = None) -> None:
    s = state.settings
    servers = []
    drain = Drain()  # one per process: every role's app drains together
    for role in s.roles:
        app = wrap(create_app(state, role), s, drain)
        config = uvicorn.Config(app, host=s.host, port=s.ports[role], log_level="warning", lifespan="off", access_log=False)
        servers.append(_Server(config))

    def stop(*_: Any) -> None:
        for srv in servers:
            srv.should_exit = True

    # SIGTERM/SIGINT: 503 new requests, let running ones finish (grace), cancel the rest, then stop
    shutdown.install(asyncio.get_running_loop(), drain, s.shutdown_grace_s, stop)
    tasks = [asyncio.create_task(srv.serve()) for srv in servers]
    for role in s.roles:
        log.warning("capibara6 %s role on http://%s:%d", role, s.host, s.ports[role])
    # listening (and /health 200) first; /ready only once the warmup models have generated
    warm = asyncio.create_task(_warm_then_ready(state))
    try:
        await asyncio.gather(*tasks)
    finally:
        warm.cancel()
        await asyncio.gather(warm, return_exceptions=True)
        await state.pool.close()


async def _warm_then_ready(state: AppState) -> None:
    await state.pool.warmup()
    state.ready.set()


def server_states(url: str, timeout: float = 2.0) -> dict[str, str] | None:
    """Model id -> pool state from a running server's /v1/models; None when nothing answers."""
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", timeout=timeout)
        r.raise_for_status()
        return {str(m["id"]): str(m.get("status", "?")) for m in r.json()["data"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def print_models(registry: Registry, out: Any = None, states: dict[str, str] | None = None) -> None:
    """The registry; with `states` (from a running server) each model's pool state too."""
    out = out or sys.stdout  # looked up per call, so a redirected stdout is honoured
    print(f"{'id':28} {'state':11} {'backend':9} {'n_ctx':>6} {'threads':>7}  tags / source", file=out)
    for mid, spec in registry.models.items():
        src = spec.source.label
        threads = resolve_threads(spec.n_threads)
        state = "not running" if states is None else states.get(mid, "unknown")
        print(f"{mid:28} {state:11} {spec.backend:9} {spec.n_ctx:>6} {threads:>7}  [{', '.join(spec.tags)}] {src}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":  # a client of any server: needs no registry
        from .bench.cli import run as run_bench

        return run_bench(args)
    if args.command == "doctor":  # its own child processes; prints a report, exit 1 if anything cannot generate
        from .doctor import run as run_doctor

        return run_doctor(args)
    setup_logging(os.environ.get("CAPIBARA6_LOG_LEVEL", "INFO"))  # one JSON object per line
    try:
        config_path = Path(args.config or "models.yaml")
        registry = load_registry(config_path)
        if args.command == "models":
            print_models(registry, states=server_states(args.url))
            return 0
        settings = settings_from_args(args, registry.server)
    except ConfigError as err:
        print(f"capibara6: {err}", file=sys.stderr)
        return 2
    crash.install()  # a fatal signal in a backend: a last JSON line naming the model, then faulthandler's dump
    asyncio.run(run_servers(AppState.create(registry, settings)))
    return 0
