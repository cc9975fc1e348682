"""Raw calls for the fuzz tests: bytes in, an `Outcome` out, on one event loop in a thread.

Every request goes out as bytes through a generic grpc.aio method with no serializer, so bytes
that are not a valid protobuf reach the server exactly as drawn. The outcome records the status
code, its ErrorInfo (reason, domain) when the status carries one, the response bytes and how
long the call took. `LoopThread` runs one asyncio loop for the whole module (gRPC channels and
UCX endpoints live on it) and lets the synchronous hypothesis tests run coroutines there.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    reason: str | None = None
    domain: str | None = None
    responses: list[bytes] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    def __str__(self) -> str:
        return (f"{self.code.name} reason={self.reason} domain={self.domain} after "
                f"{self.elapsed:.2f}s: {self.details[:300]}")


def outcome_of(err: grpc.RpcError, started: float, responses: list[bytes]) -> Outcome:
    reason = domain = None
    try:
        status = rpc_status.from_call(err)
    except Exception:  # noqa: BLE001 - a malformed status counts as untyped
        status = None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            reason, domain = info.reason, info.domain
    return Outcome(err.code(), err.details() or "", reason, domain, responses,
                   time.monotonic() - started)


class Caller:
    """Raw unary, server-streaming and bidi calls on one channel (created on the loop)."""

    def __init__(self, address: str) -> None:
        self.address = address
        options = (("grpc.max_send_message_length", 32 << 20), ("grpc.max_receive_message_length", 32 << 20))
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self._sync = grpc.insecure_channel(address, options=options)

    async def unary(self, method: str, data: bytes, timeout: float) -> Outcome:
        started = time.monotonic()
        try:
            reply = await self.channel.unary_unary(method)(data, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            return outcome_of(err, started, [])
        return Outcome(grpc.StatusCode.OK, responses=[reply], elapsed=time.monotonic() - started)

    async def server_stream(self, method: str, data: bytes, timeout: float) -> Outcome:
        started, replies = time.monotonic(), []
        call = self.channel.unary_stream(method)(data, timeout=timeout)
        try:
            async for reply in call:
                replies.append(reply)
        except grpc.aio.AioRpcError as err:
            return outcome_of(err, started, replies)
        return Outcome(grpc.StatusCode.OK, responses=replies, elapsed=time.monotonic() - started)

    async def bidi(self, method: str, messages: Sequence[bytes], timeout: float) -> Outcome:
        """Send every message (then half-close), read every response until the stream ends.

        On grpc's synchronous client, in a thread: when the server ends a stream while the
        client still has messages to send, grpc.aio's client (grpcio 1.85) reports its own
        INTERNAL "Internal error from Core" about half the time instead of the server's status;
        the synchronous client reports the server's status."""
        return await asyncio.to_thread(self._bidi, method, list(messages), timeout)

    def _bidi(self, method: str, messages: list[bytes], timeout: float) -> Outcome:
        started, replies = time.monotonic(), []
        try:
            for reply in self._sync.stream_stream(method)(iter(messages), timeout=timeout):
                replies.append(reply)
        except grpc.RpcError as err:
            return outcome_of(err, started, replies)
        return Outcome(grpc.StatusCode.OK, responses=replies, elapsed=time.monotonic() - started)

    async def close(self) -> None:
        await self.channel.close()
        self._sync.close()


class LoopThread:
    """One asyncio loop in a daemon thread; `run(coro)` waits for its result from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
