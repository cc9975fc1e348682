"""The router's OpenAI-compatible HTTP front door: aiohttp on the router's own event loop.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or server-sent events with
`stream: true`), `GET /v1/models`, `GET /health`. A request is checked and translated by
`openai_protocol`, runs on `RouterServicer.generate` in-process (the same logic as the gRPC
`Generate`, without a gRPC hop), and is shaped by `openai_results`.

Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}` with `code` = the
ErrorInfo reason and the status from `HTTP_STATUS` (INVALID_ARGUMENT 400, NOT_FOUND 404,
FAILED_PRECONDITION 409, RESOURCE_EXHAUSTED 429 with `Retry-After`, UNAVAILABLE 503,
DEADLINE_EXCEEDED 504, ...). A stream answers its HTTP status only once its first token (or
its failure) is known, so a request refused before any token gets the proper status; a failure
after that is one last `data: {"error": ...}` event before `data: [DONE]`. A client that goes
away cancels the handler (aiohttp's `handler_cancellation`), which closes the Generate stream:
every sample is cancelled and both sides aborted, as for a cancelled gRPC call.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import time
from contextlib import aclosing
from typing import Any

import grpc
from aiohttp import web

from pdmesh import metrics
from pdmesh.errors import Internal, InvalidArgument, PdmeshError
from pdmesh.reasons import Reason
from pdmesh.router.chat_template import ChatFormatter
from pdmesh.router.instances import DECODE, PREFILL, InstanceTable
from pdmesh.router.openai_protocol import CHAT, COMPLETION, parse
from pdmesh.router.openai_results import Run, chunk, completion_body, deltas, usage_chunk
from pdmesh.router.service import RouterServicer
from pdmesh.tls import TlsConfig

log = logging.getLogger(__name__)
C = grpc.StatusCode
HTTP_STATUS = {C.INVALID_ARGUMENT: 400, C.OUT_OF_RANGE: 400, C.UNAUTHENTICATED: 401,
               C.PERMISSION_DENIED: 403, C.NOT_FOUND: 404, C.FAILED_PRECONDITION: 409,
               C.ALREADY_EXISTS: 409, C.ABORTED: 409, C.RESOURCE_EXHAUSTED: 429, C.CANCELLED: 499,
               C.UNIMPLEMENTED: 501, C.UNAVAILABLE: 503, C.DEADLINE_EXCEEDED: 504}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error",
               499: "cancelled", 503: "service_unavailable_error", 504: "timeout_error"}
MAX_BODY = 4 * 1024 * 1024


def error_response(err: PdmeshError) -> web.Response:
    """`err` as OpenAI's error body with the HTTP status of its gRPC code."""
    status = HTTP_STATUS.get(err.code, 500)
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
        headers["retry-after-ms"] = str(round(err.retry_after_s * 1e3))  # the openai client reads it
    return web.json_response(error_body(err), status=status, headers=headers)


def error_body(err: PdmeshError) -> dict[str, Any]:
    status = HTTP_STATUS.get(err.code, 500)
    return {"error": {"message": err.message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": err.metadata.get("param"), "code": err.reason}}


def _sse(body: Any) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class HttpApi:
    """The aiohttp application in front of one `RouterServicer`."""

    def __init__(self, servicer: RouterServicer, table: InstanceTable, served_model: str,
                 chat: ChatFormatter | None = None) -> None:
        self.servicer, self.table = servicer, table
        self.served_model = served_model
        self.chat = chat or ChatFormatter()
        self.started = int(time.time())
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, host: str, port: int, tls: TlsConfig | None = None) -> int:
        """Serve on host:port (0: a free one) and return the port; OSError if it is taken."""
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=server_ssl(tls), reuse_port=False)
        try:
            await site.start()
        except OSError:
            await self.runner.cleanup()
            raise
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # --- routes -----------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_model, "object": "model", "created": self.started, "owned_by": "pdmesh"}]})

    async def health(self, request: web.Request) -> web.Response:
        """200 while a healthy prefill and a healthy decode instance are known, else 503."""
        counts = {name: sum(1 for e in self.table.list() if e.role == role and e.healthy)
                  for name, role in (("prefill", PREFILL), ("decode", DECODE))}
        ok = all(counts.values())
        return web.json_response({"status": "ok" if ok else "unavailable", "healthy_instances": counts},
                                 status=200 if ok else 503)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETION)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        with metrics.rpc(f"HTTP {request.path}") as outcome:
            try:
                run = Run(parse(kind, await _json(request), self.served_model, self.chat))
                if run.job.stream:
                    return await self._stream(request, run, outcome)
                async for _ in deltas(self.servicer.generate, run):
                    pass
                return web.json_response(completion_body(run))
            except Exception as exc:  # noqa: BLE001 - every failure answers a typed body
                err = _typed(exc)
                outcome.failed(err)
                return error_response(err)

    async def _stream(self, request: web.Request, run: Run, outcome) -> web.StreamResponse:
        async with aclosing(deltas(self.servicer.generate, run)) as events:
            first = await anext(events, None)  # a refusal before any token keeps its HTTP status
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                if first is not None:
                    await response.write(_sse(chunk(run, first)))
                async for delta in events:
                    await response.write(_sse(chunk(run, delta)))
                if run.job.include_usage:
                    await response.write(_sse(usage_chunk(run)))
            except ConnectionError:  # the client went away: aclosing cancels and aborts the rest
                outcome.code = "CANCELLED"
                return response
            except Exception as exc:  # noqa: BLE001 - after the first token: an error event
                err = _typed(exc)
                outcome.failed(err)
                await response.write(_sse(error_body(err)))
            await response.write(b"data: [DONE]\n\n")
            return response


async def _json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request body is not JSON: {exc}", reason=Reason.INVALID_JSON) from None


def _typed(exc: Exception) -> PdmeshError:
    if isinstance(exc, PdmeshError):
        return exc
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return InvalidArgument(f"the request body is larger than {MAX_BODY} bytes", reason=Reason.BODY_TOO_LARGE)
    log.exception("unexpected error in the HTTP API")
    return Internal(f"{type(exc).__name__}: {exc}")


def server_ssl(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """HTTPS with the router's certificate (and mTLS when it requires client certificates)."""
    if tls is None or not tls.has_identity:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.require_client_cert:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
