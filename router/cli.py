"""`pdmesh router`: flags and `PDMESH_ROUTER_*` variables -> `RouterConfig` -> a running router.

With `--http-port` the router also serves the OpenAI-compatible HTTP API (`http_server`) on the
same event loop; its flags read `PDMESH_HTTP_PORT`, `PDMESH_HTTP_HOST`,
`PDMESH_SERVED_MODEL_NAME` and `PDMESH_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from pdmesh import grpcutil, metrics, tls
from pdmesh.config import env, env_flag
from pdmesh.router import chat_template
from pdmesh.router.http_server import HttpApi
from pdmesh.router.instances import DECODE, PREFILL, InstanceTable
from pdmesh.router.service import RouterConfig, RouterServicer
from pdmesh.router.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAMES = (router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name,)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=env("ROUTER_HOST", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env("ROUTER_PORT", "0")), help="port (0 = a free one)")
    p.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT",
                   help="a prefill instance (repeatable)")
    p.add_argument("--decode", action="append", default=[], metavar="HOST:PORT",
                   help="a decode instance (repeatable)")
    p.add_argument("--policy", default=env("ROUTER_POLICY", "round_robin"),
                   choices=["round_robin", "least_outstanding"], help="how to pick instances")
    p.add_argument("--pin-ranks", action="store_true", default=env_flag("ROUTER_PIN_RANKS"),
                   help="pin the least-loaded prefill DP rank when the client pins none")
    p.add_argument("--align-rooms", action="store_true", default=env_flag("ROUTER_ALIGN_ROOMS"),
                   help="draw rooms with room %% dp_size == pinned rank (follow_bootstrap_room prefills)")
    p.add_argument("--max-in-flight", type=int, default=int(env("ROUTER_MAX_IN_FLIGHT", "256")),
                   help="requests in flight per instance before queueing")
    p.add_argument("--max-queued", type=int, default=int(env("ROUTER_MAX_QUEUED", "1024")),
                   help="queued requests per instance before RESOURCE_EXHAUSTED")
    http = env("HTTP_PORT", "")
    p.add_argument("--http-port", type=int, default=int(http) if http.strip() else None,
                   help="serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health) on this port (0 = a free one; env PDMESH_HTTP_PORT; default: off)")
    p.add_argument("--http-host", default=env("HTTP_HOST"),
                   help="address of the HTTP API (env PDMESH_HTTP_HOST; default: --host)")
    p.add_argument("--served-model-name", default=env("SERVED_MODEL_NAME", "pdmesh"),
                   help="model name of the HTTP API (env PDMESH_SERVED_MODEL_NAME; default pdmesh)")
    p.add_argument("--chat-template", default=env("CHAT_TEMPLATE"), metavar="FOLDER|FILE",
                   help="chat template for /v1/chat/completions: a model folder (its tokenizer_config.json "
                        "or chat_template.jinja) or a Jinja file (env PDMESH_CHAT_TEMPLATE; default: "
                        "plain 'Role: content' lines)")
    p.add_argument("--first-token-timeout-s", type=float,
                   default=float(env("ROUTER_FIRST_TOKEN_TIMEOUT_S", "60")),
                   help="a sample fails DEADLINE_EXCEEDED when its first token takes longer (default 60)")
    p.add_argument("--token-timeout-s", type=float, default=float(env("ROUTER_TOKEN_TIMEOUT_S", "30")),
                   help="... or when a next token takes longer than this after the last (default 30)")
    tls.add_arguments(p)
    metrics.add_arguments(p)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(host=args.host, port=args.port, policy=args.policy, pin_ranks=args.pin_ranks,
                        align_rooms=args.align_rooms, max_in_flight=args.max_in_flight,
                        max_queued=args.max_queued, prefills=tuple(args.prefill), decodes=tuple(args.decode),
                        first_token_timeout_s=args.first_token_timeout_s,
                        token_timeout_s=args.token_timeout_s,
                        tls=tls.from_args(args), metrics_port=args.metrics_port,
                        metrics_host=args.metrics_host, http_port=args.http_port,
                        http_host=args.http_host, served_model_name=args.served_model_name,
                        chat_template=args.chat_template)


class RouterApp:
    """A started router: its server, port and instance table."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.table = InstanceTable(policy=config.policy, max_in_flight=config.max_in_flight,
                                   max_queued=config.max_queued, queue_timeout_s=config.queue_timeout_s,
                                   tls=config.tls)
        self.servicer = RouterServicer(self.table, config)
        self.server, self.port, self.health = grpcutil.create_server(
            f"{config.host}:{config.port}",
            [lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(self.servicer, s)],
            SERVICE_NAMES, tls=config.tls)
        self.http: HttpApi | None = None
        self.http_port: int | None = None
        if config.http_port is not None:  # the template is read now: a bad one stops the start
            self.http = HttpApi(self.servicer, self.table, config.served_model_name,
                                chat_template.load(config.chat_template))

    async def start(self) -> "RouterApp":
        await self.server.start()
        if self.http is not None:
            host = self.config.http_host or self.config.host
            try:
                self.http_port = await self.http.start(host, self.config.http_port, self.config.tls)
            except OSError as exc:
                await self.server.stop(None)
                raise grpcutil.BindError(f"cannot serve the HTTP API on {host}:{self.config.http_port}: "
                                         f"{exc}") from None
        for address in self.config.prefills:
            await self.table.add(PREFILL, address)
        for address in self.config.decodes:
            await self.table.add(DECODE, address)
        await grpcutil.set_serving(self.health, SERVICE_NAMES)
        metrics.enable("router")
        metrics.track(self.table, InstanceTable.gauge_samples)  # admission and health per instance
        return self

    async def stop(self, grace: float = 5.0) -> None:
        await grpcutil.set_serving(self.health, SERVICE_NAMES, serving=False)
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        await self.table.close()


async def serve(config: RouterConfig) -> None:
    app = await RouterApp(config).start()
    tls.warn_if_exposed("pdmesh router", config.host, config.tls)
    endpoint = metrics.start("router", config.metrics_port, config.metrics_host or config.host,
                             tls=config.tls)
    if app.http_port is not None:
        scheme = "https" if config.tls is not None and config.tls.has_identity else "http"
        print(f"pdmesh router HTTP API at {scheme}://{config.http_host or config.host}:{app.http_port}/v1 "
              f"(model {config.served_model_name!r})", flush=True)
    print(f"pdmesh router: serving on {config.host}:{app.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()
    if endpoint is not None:
        endpoint.close()


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        chat_template.load(config.chat_template)  # a missing or broken template stops the start
    except ValueError as exc:  # inconsistent TLS flags, a bad chat template
        print(f"pdmesh router: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except grpcutil.BindError as exc:  # a port already served: say which, exit 1
        print(f"pdmesh router: {exc}", file=sys.stderr)
        return 1
    return 0
