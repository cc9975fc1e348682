"""gRPC plumbing shared by every pdmesh server and client (grpc.aio).

Owns: server creation (`create_server`: a port that is already served fails loudly, health and
reflection always on, ErrorInfo reflected so grpcurl decodes it), error translation for servicer
methods (`translate_errors`), and channel creation with one set of options (`open_channel`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

import grpc
from grpc._cython import cygrpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdmesh import logs, metrics
from pdmesh.errors import Internal, PdmeshError
from pdmesh.malformed import MalformedRequests

if TYPE_CHECKING:
    from pdmesh.tls import TlsConfig

log = logging.getLogger(__name__)

# grpc's default SO_REUSEPORT lets a second server bind a port already served: turn it off.
SERVER_OPTIONS = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # Our clients ping every 10 s (liveness of idle channels); without these the server answers
    # with GOAWAY "too_many_pings" and fails calls in flight.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
)
# Names that reflection must list besides the services, so grpcurl can decode error details.
EXTRA_REFLECTED = (error_details_pb2.DESCRIPTOR.message_types_by_name["ErrorInfo"].full_name,
                   error_details_pb2.DESCRIPTOR.message_types_by_name["RetryInfo"].full_name)


class BindError(RuntimeError):
    """The server could not take its port (already served, or not allowed)."""


def create_server(
    address: str,
    register: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: Iterable[str],
    *,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    tls: "TlsConfig | None" = None,
) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    """Build a grpc.aio server on `address` ("host:port"; port 0 picks a free one).

    `register` are callables such as `lambda s: add_FooServicer_to_server(impl, s)`;
    `service_names` their full names for health and reflection. Returns the server (not yet
    started), the bound port and the health servicer (every service starts SERVING).
    `tls` (pdmesh.tls.TlsConfig) serves TLS, or mTLS when it requires client certificates.
    """
    if credentials is None and tls is not None:
        credentials = tls.server_credentials()
    # Undecodable request bytes answer INVALID_ARGUMENT/MALFORMED_REQUEST (pdmesh.malformed).
    server = grpc.aio.server(options=SERVER_OPTIONS,
                             interceptors=[*interceptors, MalformedRequests()])
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(
        (*names, *EXTRA_REFLECTED, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise BindError(f"cannot bind {address}: {exc}") from exc
    if port == 0:
        raise BindError(f"cannot bind {address}: the port is in use or not allowed")
    return server, port, health_servicer


async def set_serving(health_servicer: Any, names: Iterable[str], serving: bool = True) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *names):
        result = health_servicer.set(name, status)
        if inspect.isawaitable(result):
            await result


async def abort_with(context: grpc.aio.ServicerContext, error: PdmeshError) -> None:
    """Abort the call with `error`'s code, message and ErrorInfo. A call that already ended (its
    deadline passed, its caller left) has nobody to tell: grpc would fail the write and log it as
    an error, so it ends as cancelled instead."""
    left = context.time_remaining()
    if context.done() or (left is not None and left <= 0):
        raise asyncio.CancelledError(f"the call ended before its status: {error.reason}")
    try:
        await context.abort_with_status(error.to_status())
    except cygrpc.ExecuteBatchError:  # it ended while the status was being written
        raise asyncio.CancelledError(f"the call ended while its status was written: {error.reason}") from None


def _room_field(error: PdmeshError) -> dict[str, str]:
    room = error.metadata.get("bootstrap_room")
    return {"room": room} if room else {}


def translate_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an aio servicer method so a `PdmeshError` becomes its rich status.

    Unexpected exceptions become INTERNAL with the exception named (and are logged), never a
    silent UNKNOWN. Works for unary (coroutine) and streaming (async generator) methods. Every
    call is counted and timed (`pdmesh.metrics.rpc`); a failure is counted by reason and logged
    with the request's bound fields (`pdmesh.logs`).
    """

    def to_error(exc: BaseException) -> PdmeshError:
        if isinstance(exc, PdmeshError):
            return exc
        log.exception("unexpected error in %s", method.__qualname__)
        return Internal(f"{type(exc).__name__}: {exc}")

    handler = method.__qualname__

    def report(outcome: metrics.RpcOutcome, error: PdmeshError) -> PdmeshError:
        """Count the failure (pdmesh_failures_total) and log it with the request's fields."""
        outcome.failed(error)
        level = logging.DEBUG if error.code == grpc.StatusCode.INVALID_ARGUMENT else logging.INFO
        logs.event(log, level, "rpc failed", handler=handler, code=error.code.name,
                   reason=error.reason, **_room_field(error))
        return error

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            with metrics.rpc(handler) as outcome:
                try:
                    async for item in method(self, request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - translated into a typed status
                    await abort_with(context, report(outcome, to_error(exc)))
        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        with metrics.rpc(handler) as outcome:
            try:
                return await method(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - translated into a typed status
                await abort_with(context, report(outcome, to_error(exc)))
    return unary_wrapper


def open_channel(target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 options: Iterable[tuple[str, Any]] = (), tls: "TlsConfig | None" = None
                 ) -> grpc.aio.Channel:
    """One aio channel per peer; reuse it for every call to that peer. `tls`
    (pdmesh.tls.TlsConfig) opens a TLS channel that presents its certificate, if any."""
    opts = (*CHANNEL_OPTIONS, *options)
    if tls is not None:
        credentials = credentials or tls.channel_credentials()
        opts = (*opts, *tls.channel_options())
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)


async def call(coro: Awaitable[Any]) -> Any:
    """Await a client call and turn a failed status into the typed `PdmeshError`."""
    try:
        return await coro
    except grpc.aio.AioRpcError as err:
        raise PdmeshError.from_rpc_error(err) from None


def run_async(main: Awaitable[Any], loop: str = "auto") -> Any:
    """Run an entry point's coroutine: on uvloop when `loop` is "uvloop" or "auto" and uvloop is
    installed (measured faster for grpc.aio here, bench/bootstrap.py), else on asyncio's loop."""
    if loop not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"event loop must be auto, uvloop or asyncio, got {loop!r}")
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            return uvloop.run(main)
    return asyncio.run(main)
