"""The catalogue of pdmesh's error reasons: each reason once, with its gRPC code and meaning.

Every `PdmeshError` carries a `google.rpc.ErrorInfo` (domain `pdmesh`) whose `reason` is one of
these names. The closed set is also the proto enum `pdmesh.common.v1.ErrorReason`
(protos/pdmesh/common/v1/error_reason.proto), whose value names are these names behind the
`ERROR_REASON_` prefix that buf STANDARD asks for; importing this module checks that both lists
are the same. The reason string on the wire is the bare name (`INSTANCE_DRAINING`), as grpcurl
shows it. Callers raise and compare with the members (`Reason.INSTANCE_DRAINING`), never with a
string literal; a member is a `str`, so it also compares equal to the name a peer sent.

A reason has exactly one code: raising a class whose code differs is a bug that
tests/test_reasons.py finds. The reasons named like a code (`NOT_FOUND`) are the defaults of
errors without a more specific one, and of statuses that came without an ErrorInfo.
"""

from __future__ import annotations

import enum

import grpc

from pdmesh.common.v1 import error_reason_pb2

C = grpc.StatusCode
PROTO_PREFIX = "ERROR_REASON_"


class Reason(enum.StrEnum):
    """One ErrorInfo reason; `.code` is its gRPC status code and `.meaning` says when it is sent."""

    code: grpc.StatusCode
    meaning: str

    def __new__(cls, value: str, code: grpc.StatusCode, meaning: str) -> "Reason":
        member = str.__new__(cls, value)
        member._value_ = value
        member.code, member.meaning = code, meaning
        return member

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list) -> str:
        return name

    # --- defaults: one per gRPC code, for errors without a more specific reason ---------------
    UNKNOWN = enum.auto(), C.UNKNOWN, "a failure of no known kind (a foreign peer's status)"
    CANCELLED = enum.auto(), C.CANCELLED, "the call was cancelled"
    INVALID_ARGUMENT = enum.auto(), C.INVALID_ARGUMENT, "bad input; nothing changed"
    DEADLINE_EXCEEDED = enum.auto(), C.DEADLINE_EXCEEDED, "the deadline passed"
    NOT_FOUND = enum.auto(), C.NOT_FOUND, "the thing asked for is not known"
    ALREADY_EXISTS = enum.auto(), C.ALREADY_EXISTS, "the thing to create exists already"
    PERMISSION_DENIED = enum.auto(), C.PERMISSION_DENIED, "the caller may not do this"
    RESOURCE_EXHAUSTED = enum.auto(), C.RESOURCE_EXHAUSTED, "a limit was reached"
    FAILED_PRECONDITION = enum.auto(), C.FAILED_PRECONDITION, "the system is not in a state for this"
    ABORTED = enum.auto(), C.ABORTED, "the operation was aborted"
    OUT_OF_RANGE = enum.auto(), C.OUT_OF_RANGE, "a value is past its valid range"
    UNIMPLEMENTED = enum.auto(), C.UNIMPLEMENTED, "the method is not served here"
    INTERNAL = enum.auto(), C.INTERNAL, "a bug or an unexpected failure"
    UNAVAILABLE = enum.auto(), C.UNAVAILABLE, "the peer cannot be reached now"
    DATA_LOSS = enum.auto(), C.DATA_LOSS, "data was lost or corrupted"
    UNAUTHENTICATED = enum.auto(), C.UNAUTHENTICATED, "the caller is not who it must be"

    # --- requests and their input -------------------------------------------------------------
    MALFORMED_REQUEST = enum.auto(), C.INVALID_ARGUMENT, "the request bytes are not its protobuf"
    INVALID_BOOTSTRAP_ROOM = enum.auto(), C.INVALID_ARGUMENT, "a room outside 1 .. 2^63-1"
    DP_RANK_OUT_OF_RANGE = enum.auto(), C.INVALID_ARGUMENT, "a DP rank not below dp_size"
    DP_RANK_MISSING = enum.auto(), C.INVALID_ARGUMENT, "a required DP rank is unset"
    INVALID_DP_SIZE = enum.auto(), C.INVALID_ARGUMENT, "dp_size outside 1 .. 1024"
    INVALID_ADDRESS = enum.auto(), C.INVALID_ARGUMENT, "an address that is not host:port"
    EMPTY_PROMPT = enum.auto(), C.INVALID_ARGUMENT, "the prompt has neither text nor token ids"
    INVALID_PROMPT = enum.auto(), C.INVALID_ARGUMENT, "the engine got an empty prompt"
    PROMPT_TOO_LONG = enum.auto(), C.INVALID_ARGUMENT, "the prompt does not fit the model"
    SEQUENCE_TOO_LONG = enum.auto(), C.INVALID_ARGUMENT, "prompt and output exceed the model's length"
    TOKEN_OUT_OF_VOCABULARY = enum.auto(), C.INVALID_ARGUMENT, "a prompt token id past the vocabulary"
    INVALID_TOKEN_ID = enum.auto(), C.INVALID_ARGUMENT, "the engine got a token id past the vocabulary"
    INVALID_SAMPLING_PARAMS = enum.auto(), C.INVALID_ARGUMENT, "sampling parameters out of range"
    INVALID_TRANSFER_TOKEN = enum.auto(), C.INVALID_ARGUMENT, "a transfer token not of 16 to 64 bytes"
    INVALID_REQUEST_ID = enum.auto(), C.INVALID_ARGUMENT, "a request_id longer than 128 characters"
    MISSING_PREFILL = enum.auto(), C.INVALID_ARGUMENT, "a decode request names no prefill"

    # --- bootstrap service ---------------------------------------------------------------------
    INVALID_INSTANCE_ID = enum.auto(), C.INVALID_ARGUMENT, "an instance id empty or too long"
    INVALID_INSTANCE_INFO = enum.auto(), C.INVALID_ARGUMENT, "instance info that breaks its rules"
    INSTANCE_NOT_FOUND = enum.auto(), C.NOT_FOUND, "no instance under that id or address"
    INSTANCE_EPOCH_STALE = enum.auto(), C.FAILED_PRECONDITION, "an epoch lower than the registered one"
    INSTANCE_EPOCH_CONFLICT = enum.auto(), C.ALREADY_EXISTS, "the same epoch registered with other info"
    INSTANCE_EPOCH_MISMATCH = enum.auto(), C.FAILED_PRECONDITION, "the epoch named is not the registered one"
    INSTANCE_EPOCH_CHANGED = enum.auto(), C.FAILED_PRECONDITION, "the instance of a waited room restarted"
    ROOM_NOT_FOUND = enum.auto(), C.NOT_FOUND, "the room is not registered"
    ROOM_ALREADY_REGISTERED = enum.auto(), C.ALREADY_EXISTS, "the room is registered by another rank or request"
    ROOM_WAIT_TIMEOUT = enum.auto(), C.DEADLINE_EXCEEDED, "a waited room did not register in time"
    REGISTRY_FULL = enum.auto(), C.RESOURCE_EXHAUSTED, "the service holds its most room records"
    TOO_MANY_INSTANCES = enum.auto(), C.RESOURCE_EXHAUSTED, "the service holds its most instances"
    TOO_MANY_WAITERS = enum.auto(), C.RESOURCE_EXHAUSTED, "the service has its most lookups waiting"
    BOOTSTRAP_UNREACHABLE = enum.auto(), C.UNAVAILABLE, "the bootstrap service cannot be reached"
    BOOTSTRAP_UNAVAILABLE = enum.auto(), C.UNAVAILABLE, "a room's registration failed for lack of the service"
    BOOTSTRAP_TIMEOUT = enum.auto(), C.DEADLINE_EXCEEDED, "the bootstrap service did not answer in time"
    BOOTSTRAP_PROTOCOL = enum.auto(), C.UNAVAILABLE, "the bootstrap service answered out of protocol"
    CLIENT_CLOSED = enum.auto(), C.UNAVAILABLE, "the stream client was closed"

    # --- DP-rank rules ---------------------------------------------------------------------------
    FOLLOW_BOOTSTRAP_ROOM_CONFLICT = enum.auto(), C.FAILED_PRECONDITION, "a rank other than room % dp_size took the room"
    PREFILL_DP_RANK_HINT_MISMATCH = enum.auto(), C.FAILED_PRECONDITION, "the rank hint names another rank"

    # --- router ----------------------------------------------------------------------------------
    INVALID_ROUTER_CONFIG = enum.auto(), C.INVALID_ARGUMENT, "a router setting out of range"
    NO_HEALTHY_INSTANCE = enum.auto(), C.UNAVAILABLE, "no healthy instance of the role"
    INSTANCE_ROLE_MISMATCH = enum.auto(), C.FAILED_PRECONDITION, "the address serves the other role"
    ROUTER_AT_CAPACITY = enum.auto(), C.RESOURCE_EXHAUSTED, "the instance's queue is full; retry later"
    ROUTER_UNREACHABLE = enum.auto(), C.UNAVAILABLE, "the router cannot be reached"
    ROUTER_FIRST_TOKEN_TIMEOUT = enum.auto(), C.DEADLINE_EXCEEDED, "no first token within the router's bound"
    ROUTER_TOKEN_TIMEOUT = enum.auto(), C.DEADLINE_EXCEEDED, "no next token within the router's bound"
    INVALID_JSON = enum.auto(), C.INVALID_ARGUMENT, "an HTTP body that is not JSON"
    BODY_TOO_LARGE = enum.auto(), C.INVALID_ARGUMENT, "an HTTP body over the limit"
    INVALID_PARAMETER = enum.auto(), C.INVALID_ARGUMENT, "an OpenAI parameter of the wrong value"
    UNSUPPORTED_PARAMETER = enum.auto(), C.INVALID_ARGUMENT, "an OpenAI parameter this server does not do"
    MODEL_NOT_FOUND = enum.auto(), C.NOT_FOUND, "the request names another model than the one served"
    INVALID_CHAT_MESSAGES = enum.auto(), C.INVALID_ARGUMENT, "chat messages of the wrong shape"
    NO_CHAT_TEMPLATE = enum.auto(), C.INVALID_ARGUMENT, "the model has no chat template"
    CHAT_TEMPLATE_ERROR = enum.auto(), C.INVALID_ARGUMENT, "the chat template failed on the messages"

    # --- instances and their ranks ---------------------------------------------------------------
    INSTANCE_DRAINING = enum.auto(), C.UNAVAILABLE, "the instance drains; nothing of the request ran"
    RANK_DIED = enum.auto(), C.UNAVAILABLE, "the DP rank process died with the request"
    RANK_UNAVAILABLE = enum.auto(), C.UNAVAILABLE, "the DP rank is restarting or unreachable"
    RANK_START_FAILED = enum.auto(), C.UNAVAILABLE, "the DP rank process did not start"
    RANK_STOPPING = enum.auto(), C.UNAVAILABLE, "the DP rank stops"
    RANK_ENDPOINT_NOT_FOUND = enum.auto(), C.NOT_FOUND, "the prefill's info lacks the rank's endpoint"
    ROOM_IN_USE = enum.auto(), C.ALREADY_EXISTS, "the rank already serves the room"
    ROOM_ABORTED = enum.auto(), C.ABORTED, "the room was aborted (AbortRoom)"
    PREFILL_COMPUTE_FAILED = enum.auto(), C.INTERNAL, "the prefill's computation failed"
    DECODE_STEP_FAILED = enum.auto(), C.INTERNAL, "a decode step failed"
    DEADLINE_BEFORE_TRANSFER = enum.auto(), C.DEADLINE_EXCEEDED, "the deadline passed before the KV moved"

    # --- KV pool and pages -----------------------------------------------------------------------
    KV_POOL_EXHAUSTED = enum.auto(), C.RESOURCE_EXHAUSTED, "the page pool has no free page for the request"
    REQUEST_LARGER_THAN_POOL = enum.auto(), C.RESOURCE_EXHAUSTED, "the request needs more pages than the pool has"
    INVALID_KV_POOL = enum.auto(), C.INVALID_ARGUMENT, "pool settings out of range"
    INVALID_PAGE_COUNT = enum.auto(), C.INVALID_ARGUMENT, "a page count out of range"
    KV_PAGE_NOT_ALLOCATED = enum.auto(), C.INVALID_ARGUMENT, "a page freed that is not allocated"
    INVALID_KV_LAYOUT = enum.auto(), C.INVALID_ARGUMENT, "a KV layout field out of range"
    INVALID_KV_TENSOR = enum.auto(), C.INVALID_ARGUMENT, "a KV tensor of the wrong shape, dtype or device"
    INVALID_LAYER_RANGE = enum.auto(), C.INVALID_ARGUMENT, "a layer range outside the layout"
    INVALID_PAGE_IDS = enum.auto(), C.INVALID_ARGUMENT, "page ids of the wrong count"
    DUPLICATE_PAGE_IDS = enum.auto(), C.INVALID_ARGUMENT, "a page id given twice"
    PAGE_ID_OUT_OF_RANGE = enum.auto(), C.INVALID_ARGUMENT, "a page id past the pool"
    INVALID_STAGING_BUFFER = enum.auto(), C.INVALID_ARGUMENT, "a staging buffer of the wrong size"
    INVALID_PAGE_TABLE = enum.auto(), C.INVALID_ARGUMENT, "the engine got a page table of the wrong pages"
    KV_POOL_MISMATCH = enum.auto(), C.INVALID_ARGUMENT, "the engine got a pool of the wrong geometry"

    # --- KV transfer -----------------------------------------------------------------------------
    KV_LAYOUT_MISMATCH = enum.auto(), C.FAILED_PRECONDITION, "prefill and decode KV layouts differ"
    KV_SIZE_MISMATCH = enum.auto(), C.FAILED_PRECONDITION, "the decode expects another byte count"
    KV_ROOM_NOT_FOUND = enum.auto(), C.NOT_FOUND, "the prefill rank does not hold the room"
    KV_ROOM_ALREADY_OFFERED = enum.auto(), C.FAILED_PRECONDITION, "the room's KV is offered already"
    KV_TRANSFER_ALREADY_CLAIMED = enum.auto(), C.FAILED_PRECONDITION, "another transfer took the room's KV"
    KV_TRANSFER_ID_IN_USE = enum.auto(), C.ALREADY_EXISTS, "a transfer id already in use on the link"
    KV_TRANSFER_IN_PROGRESS = enum.auto(), C.ALREADY_EXISTS, "the decode already fetches the room"
    KV_TRANSFER_TOKEN_MISMATCH = enum.auto(), C.UNAUTHENTICATED, "the transfer token is not the room's"
    INVALID_CHUNKING = enum.auto(), C.INVALID_ARGUMENT, "layers_per_chunk out of range"
    INVALID_PAGE_RUNS = enum.auto(), C.INVALID_ARGUMENT, "page runs that do not sum to the request's pages"
    INVALID_TRANSFER_PATH = enum.auto(), C.INVALID_ARGUMENT, "an unknown KV transfer path"
    KV_TRANSFER_ABORTED = enum.auto(), C.CANCELLED, "one side aborted the transfer"
    KV_TRANSFER_CANCELLED = enum.auto(), C.CANCELLED, "the request holding the transfer ended"
    KV_TRANSPORT_CLOSED = enum.auto(), C.CANCELLED, "the transport closed under the transfer"
    KV_TRANSFER_BAD_MESSAGE = enum.auto(), C.DATA_LOSS, "an undecodable or inconsistent control message"
    KV_TRANSFER_BAD_FRAME = enum.auto(), C.UNAVAILABLE, "a malformed control frame; the link is dropped"
    KV_TRANSFER_CORRUPT = enum.auto(), C.DATA_LOSS, "the trailer check failed; nothing was committed"
    KV_TRANSFER_TRUNCATED = enum.auto(), C.DATA_LOSS, "a chunk arrived shorter than planned"
    KV_TRANSFER_DEADLINE_EXCEEDED = enum.auto(), C.DEADLINE_EXCEEDED, "a transfer state ran past its bound"
    KV_TRANSFER_CONNECT_TIMEOUT = enum.auto(), C.DEADLINE_EXCEEDED, "the link to the peer did not open in time"
    KV_TRANSFER_PEER_UNREACHABLE = enum.auto(), C.UNAVAILABLE, "the peer's transfer endpoint cannot be reached"
    KV_TRANSFER_PEER_LOST = enum.auto(), C.UNAVAILABLE, "the link to the peer broke"
    KV_TRANSFER_PEER_STUCK = enum.auto(), C.UNAVAILABLE, "the peer stopped reading the link"
    KV_TRANSFER_NO_ANSWER = enum.auto(), C.UNAVAILABLE, "the sender did not answer the request in time"
    KV_TRANSFER_LINK_DROPPED = enum.auto(), C.UNAVAILABLE, "a debug fault dropped the link"
    KV_LINK_UNRESPONSIVE = enum.auto(), C.UNAVAILABLE, "the link answers no ping"
    KV_SAME_HOST_OFF = enum.auto(), C.FAILED_PRECONDITION, "the same-host path is turned off"
    KV_SAME_HOST_OTHER_HOST = enum.auto(), C.FAILED_PRECONDITION, "the peer runs on another host"
    KV_SAME_HOST_NO_POOL = enum.auto(), C.FAILED_PRECONDITION, "the sender has no pool to write from"
    KV_SAME_HOST_MAP_FAILED = enum.auto(), C.FAILED_PRECONDITION, "the receiver's pool could not be mapped"
    KV_SAME_HOST_NOT_MAPPED = enum.auto(), C.FAILED_PRECONDITION, "the request names a pool not mapped"
    KV_SAME_HOST_DEVICE_MISMATCH = enum.auto(), C.FAILED_PRECONDITION, "the pools live on unlike devices"
    KV_SAME_HOST_COPY_FAILED = enum.auto(), C.DATA_LOSS, "the same-host copy failed"

    # --- models ----------------------------------------------------------------------------------
    INVALID_MODEL_FOLDER = enum.auto(), C.INVALID_ARGUMENT, "not a model folder or .gguf file"
    INVALID_MODEL_FILE = enum.auto(), C.INVALID_ARGUMENT, "a model file that cannot be read"
    INVALID_MODEL_CONFIG = enum.auto(), C.INVALID_ARGUMENT, "a model config out of range"
    UNSUPPORTED_MODEL_ARCHITECTURE = enum.auto(), C.INVALID_ARGUMENT, "a model architecture pdmesh does not run"
    UNSUPPORTED_GGUF_QUANTIZATION = enum.auto(), C.INVALID_ARGUMENT, "a GGUF tensor type pdmesh does not read"
    MODEL_NOT_INSTALLED = enum.auto(), C.FAILED_PRECONDITION, "the named model is not in the cache"
    MODEL_CACHE_UNWRITABLE = enum.auto(), C.FAILED_PRECONDITION, "the model cache cannot be written"

    @classmethod
    def of(cls, name: str) -> "Reason | None":
        """The member named `name` (a reason a peer sent), or None for a foreign one."""
        return cls._value2member_map_.get(name)  # type: ignore[return-value]

    @property
    def proto(self) -> int:
        """The `pdmesh.common.v1.ErrorReason` value of this reason."""
        return error_reason_pb2.ErrorReason.Value(PROTO_PREFIX + self.value)


def _check_against_proto() -> None:
    names = {n[len(PROTO_PREFIX):] for n in error_reason_pb2.ErrorReason.keys()} - {"UNSPECIFIED"}
    ours = set(Reason.__members__)
    if names != ours:
        raise ImportError(f"pdmesh.common.v1.ErrorReason and pdmesh.reasons differ: only in the proto "
                          f"{sorted(names - ours)}, only here {sorted(ours - names)}")


_check_against_proto()
