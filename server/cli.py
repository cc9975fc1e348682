"""`pdmesh bootstrap` (and `python -m pdmesh.server`): run the bootstrap service standalone.

Flags default to `PDMESH_BOOTSTRAP_*` environment variables. Prints one line
`pdmesh bootstrap: serving on HOST:PORT` when ready; stops gracefully on SIGTERM or Ctrl-C
(calls in flight get `--grace` seconds); a port already served is an error at start (exit 2).
`--demo` also registers a demo instance and rooms, looks them up and prints what happened.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from pdmesh import metrics, tls
from pdmesh.config import env
from pdmesh.grpcutil import BindError, run_async
from pdmesh.server.config import DEFAULT_PORT, BootstrapConfig
from pdmesh.server.service import create_bootstrap_server

log = logging.getLogger(__name__)
_DEFAULTS = BootstrapConfig()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    def opt(flag: str, name: str, kind, default, help_text: str) -> None:
        parser.add_argument(flag, type=kind, default=kind(env(f"BOOTSTRAP_{name}", str(default))),
                            help=f"{help_text} (env PDMESH_BOOTSTRAP_{name}; default %(default)s)")

    opt("--host", "HOST", str, _DEFAULTS.host, "address to listen on")
    opt("--port", "PORT", int, DEFAULT_PORT, "port to listen on; 0 picks a free one")
    opt("--room-ttl", "ROOM_TTL", float, _DEFAULTS.room_ttl_s, "seconds a room record lives")
    opt("--max-rooms", "MAX_ROOMS", int, _DEFAULTS.max_rooms, "most room records held")
    opt("--max-waiters", "MAX_WAITERS", int, _DEFAULTS.max_waiters, "most lookups waiting at once")
    opt("--max-instances", "MAX_INSTANCES", int, _DEFAULTS.max_instances, "most prefill instances")
    opt("--instance-ttl", "INSTANCE_TTL", float, _DEFAULTS.instance_ttl_s,
        "forget an instance silent this long (0: never)")
    opt("--default-wait", "DEFAULT_WAIT", float, _DEFAULTS.default_wait_s,
        "seconds a wait lasts when the caller gives no timeout")
    opt("--max-wait", "MAX_WAIT", float, _DEFAULTS.max_wait_s, "longest wait allowed")
    opt("--grace", "GRACE", float, _DEFAULTS.grace_s, "seconds calls in flight get at stop")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"),
                        default=env("EVENT_LOOP", "auto"),
                        help="event loop: uvloop when installed (auto), or asyncio's "
                             "(env PDMESH_EVENT_LOOP; default %(default)s)")
    parser.add_argument("--demo", action="store_true",
                        help="register a demo instance and rooms, look them up, print it, keep serving")
    tls.add_arguments(parser)
    metrics.add_arguments(parser)


def build_config(args: argparse.Namespace) -> BootstrapConfig:
    return BootstrapConfig(
        host=args.host, port=args.port, room_ttl_s=args.room_ttl, max_rooms=args.max_rooms,
        max_waiters=args.max_waiters, max_instances=args.max_instances,
        instance_ttl_s=args.instance_ttl, default_wait_s=args.default_wait,
        max_wait_s=args.max_wait, grace_s=args.grace, tls=tls.from_args(args),
        metrics_port=args.metrics_port, metrics_host=args.metrics_host)


async def serve(config: BootstrapConfig, demo: bool = False) -> int:
    """Run the service until SIGTERM/SIGINT; return the process exit code."""
    try:
        _, port, service = create_bootstrap_server(config.address, config)
    except BindError as exc:
        print(f"pdmesh bootstrap: {exc} (is another service already on port {config.port}?)",
              file=sys.stderr, flush=True)
        return 2
    await service.start()
    tls.warn_if_exposed("pdmesh bootstrap", config.host, config.tls)
    endpoint = metrics.start("bootstrap", config.metrics_port, config.metrics_host or config.host,
                             tls=config.tls)
    print(f"pdmesh bootstrap: serving on {config.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if demo:
            from pdmesh.server.demo import run_demo
            await run_demo(f"{config.host}:{port}", tls=config.tls)
        await stop.wait()
        print("pdmesh bootstrap: stopping", flush=True)
    finally:
        await service.stop()
        if endpoint is not None:
            endpoint.close()
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"pdmesh bootstrap: {exc}", file=sys.stderr)
        return 2
    return run_async(serve(config, demo=args.demo), args.event_loop)
