"""The one error tree of pdmesh, and its mapping to and from gRPC statuses.

Every failure a caller can see is a `PdmeshError`: it knows its gRPC status code and its
`google.rpc.ErrorInfo` reason (domain `pdmesh`, UPPER_SNAKE), with values in `metadata`.
Servers send it with `to_status()` (see `grpcutil.abort_with`); clients turn a status back into
the same class with `from_rpc_error()`, so callers never catch a bare `grpc.RpcError`. Messages
that carry a failure in their body (the transfer link, the bootstrap streams) carry the same
`google.rpc.Status` (`to_status_proto` / `from_status_proto`).

Reasons are the members of `pdmesh.reasons.Reason` (the catalogue: each with its code); a reason a
peer sent that the catalogue lacks is kept as its string.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from pdmesh.reasons import Reason

DOMAIN = "pdmesh"
#: Longest status message and ErrorInfo metadata value sent on the wire (trailers are small).
MAX_MESSAGE, MAX_METADATA_VALUE = 1024, 256


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class PdmeshError(Exception):
    """Base of every typed pdmesh failure."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[Reason] = Reason.UNKNOWN

    def __init__(self, message: str, *, reason: Reason | str | None = None,
                 metadata: Mapping[str, object] | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: A catalogue member (a `str`), or the string of a foreign reason.
        self.reason: str = Reason.of(reason) or reason if reason else self.default_reason
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        #: Sent as a google.rpc.RetryInfo detail when set (e.g. admission control's back-off).
        self.retry_after_s = retry_after_s
        #: True when decoded from a status its peer sent with details (an ErrorInfo); False for a
        #: local error and for a failure of the call itself (a connection broke, a process died).
        self.sent_by_peer = False

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    def error_info(self) -> error_details_pb2.ErrorInfo:
        metadata = {k: _clip(v, MAX_METADATA_VALUE) for k, v in self.metadata.items()}
        return error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata)

    def to_status_proto(self) -> status_pb2.Status:
        """The rich status as a `google.rpc.Status` message (code, message, packed ErrorInfo).

        The message and metadata values are clipped (`MAX_MESSAGE`, `MAX_METADATA_VALUE`): a
        status travels in trailers, and one that echoes a huge bad input would exceed the
        peer's metadata limit and arrive as a bare RESOURCE_EXHAUSTED instead of itself."""
        detail = any_pb2.Any()
        detail.Pack(self.error_info())
        details = [detail]
        if self.retry_after_s is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(any_pb2.Any())
            details[-1].Pack(retry)
        return status_pb2.Status(code=self.code.value[0], message=_clip(self.message, MAX_MESSAGE),
                                 details=details)

    def to_status(self) -> grpc.Status:
        """The rich status to send with `abort_with_status`."""
        return rpc_status.to_status(self.to_status_proto())

    @staticmethod
    def from_status_proto(status: status_pb2.Status) -> "PdmeshError":
        """The typed error a `google.rpc.Status` message carries (inside a message body)."""
        code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        reason, metadata, retry_after_s = _details(status)
        cls = _BY_REASON.get(reason or "") or _BY_CODE.get(code, PdmeshError)
        err = cls(status.message, reason=reason or _reason_for_code(code), metadata=metadata,
                  retry_after_s=retry_after_s)
        err.sent_by_peer = True
        return err

    @staticmethod
    def from_rpc_error(err: grpc.RpcError) -> "PdmeshError":
        """Rebuild the typed error from a failed call (any code, with or without ErrorInfo)."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = (err.details() if hasattr(err, "details") else None) or str(err)
        reason, metadata, retry_after_s = None, {}, None
        try:
            status = rpc_status.from_call(err)
        except Exception:  # a malformed status from a foreign peer: keep code and message
            status = None
        if status is not None:
            reason, metadata, retry_after_s = _details(status)
        cls = _BY_REASON.get(reason or "") or _BY_CODE.get(code, PdmeshError)
        typed = cls(message, reason=reason or _reason_for_code(code), metadata=metadata,
                    retry_after_s=retry_after_s)
        typed.sent_by_peer = status is not None
        return typed

    def same_as(self, other: "PdmeshError") -> bool:
        return self.code == other.code and self.reason == other.reason


def _reason_for_code(code: grpc.StatusCode) -> Reason:
    return Reason.of(code.name) or Reason.UNKNOWN


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _details(status: status_pb2.Status) -> tuple[str | None, dict[str, str], float | None]:
    """The ErrorInfo reason and metadata, and the RetryInfo delay, packed in `status`."""
    reason, metadata, retry_after_s = None, {}, None
    for detail in status.details:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(retry.DESCRIPTOR) and detail.Unpack(retry):
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, metadata, retry_after_s


class InvalidArgument(PdmeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = Reason.INVALID_ARGUMENT


class NotFound(PdmeshError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = Reason.NOT_FOUND


class AlreadyExists(PdmeshError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = Reason.ALREADY_EXISTS


class FailedPrecondition(PdmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = Reason.FAILED_PRECONDITION


class FollowBootstrapRoomConflict(FailedPrecondition):
    """A follow_bootstrap_room prefill was dispatched to a rank other than room % dp_size."""

    default_reason = Reason.FOLLOW_BOOTSTRAP_ROOM_CONFLICT


class PrefillDpRankHintMismatch(FailedPrecondition):
    """The request's disagg_prefill_dp_rank names another rank than the one that took it."""

    default_reason = Reason.PREFILL_DP_RANK_HINT_MISMATCH


class LayoutMismatch(FailedPrecondition):
    default_reason = Reason.KV_LAYOUT_MISMATCH


class EpochMismatch(FailedPrecondition):
    default_reason = Reason.INSTANCE_EPOCH_MISMATCH


class ResourceExhausted(PdmeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = Reason.RESOURCE_EXHAUSTED


class Unavailable(PdmeshError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = Reason.UNAVAILABLE


class DeadlineExceeded(PdmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = Reason.DEADLINE_EXCEEDED


class DataLoss(PdmeshError):
    code = grpc.StatusCode.DATA_LOSS
    default_reason = Reason.DATA_LOSS


class Cancelled(PdmeshError):
    code = grpc.StatusCode.CANCELLED
    default_reason = Reason.CANCELLED


class Aborted(PdmeshError):
    code = grpc.StatusCode.ABORTED
    default_reason = Reason.ABORTED


class Internal(PdmeshError):
    code = grpc.StatusCode.INTERNAL
    default_reason = Reason.INTERNAL


class Unauthenticated(PdmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = Reason.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[PdmeshError]] = {}
_BY_REASON: dict[str, type[PdmeshError]] = {}


def _index(cls: type[PdmeshError]) -> None:
    for sub in cls.__subclasses__():
        if sub.default_reason == sub.code.name:
            _BY_CODE.setdefault(sub.code, sub)
        _BY_REASON.setdefault(sub.default_reason, sub)
        _index(sub)


_index(PdmeshError)
assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]
