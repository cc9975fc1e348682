"""Undecodable request bytes become INVALID_ARGUMENT with an ErrorInfo, like any other bad input.

grpc's own answer to bytes that do not parse as the method's request message is a bare UNKNOWN
("Unexpected <class 'DecodeError'>") for unary requests, and an exception out of `context.read()`
for streams: neither carries the ErrorInfo every pdmesh status has (DESIGN.md, "Errors").
`MalformedRequests`, a server interceptor that `grpcutil.create_server` installs on every server,
wraps each method's request deserializer:

- unary requests: a message that does not parse is handed to the method as a `Malformed`
  marker, and the wrapped method aborts with INVALID_ARGUMENT (reason MALFORMED_REQUEST) before
  the servicer runs, so nothing changes;
- streamed requests: the deserializer raises `InvalidArgument` (MALFORMED_REQUEST) out of the
  read, which `grpcutil.translate_errors` sends as that status and the stream ends.

Wrapped handlers are cached per handler object, so the per-call cost is one dict lookup.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import grpc

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason

REASON = Reason.MALFORMED_REQUEST


class Malformed:
    """What a unary method receives instead of a request whose bytes did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def _error(method: str, data: bytes, exc: Exception) -> InvalidArgument:
    return InvalidArgument(
        f"the request to {method} is not a valid protobuf of its request type "
        f"({len(data)} bytes: {type(exc).__name__}: {exc}); send the message the service defines",
        reason=REASON, metadata={"method": method, "bytes": len(data)})


def _deserializer(method: str, parse: Callable[[bytes], Any], stream: bool) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad input
            error = _error(method, data, exc)
            if stream:
                raise error from None
            return Malformed(error)
    return deserialize


def _guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary-request behavior: a `Malformed` request aborts with its status."""
    if inspect.isasyncgenfunction(behavior):
        async def guarded_stream(request, context):
            if isinstance(request, Malformed):
                await context.abort_with_status(request.error.to_status())
            async for item in behavior(request, context):
                yield item
        return guarded_stream

    async def guarded(request, context):
        if isinstance(request, Malformed):
            await context.abort_with_status(request.error.to_status())
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result
    return guarded


def wrap_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with its request deserializer made safe (see the module docstring)."""
    if handler.request_deserializer is None:
        return handler
    if handler.request_streaming:
        return handler._replace(request_deserializer=_deserializer(
            method, handler.request_deserializer, stream=True))
    kind = "unary_stream" if handler.response_streaming else "unary_unary"
    return handler._replace(
        request_deserializer=_deserializer(method, handler.request_deserializer, stream=False),
        **{kind: _guard(getattr(handler, kind))})


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Server interceptor: undecodable requests get INVALID_ARGUMENT / MALFORMED_REQUEST."""

    def __init__(self) -> None:
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        cached = self._wrapped.get(id(handler))
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[id(handler)] = (
                handler, wrap_handler(handler_call_details.method, handler))
        return cached[1]
