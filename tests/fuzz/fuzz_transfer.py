"""Fuzzing a KvSender over a real UCX link: raw control messages in, typed answers out.

`RawPeer` is a bare UCX link to a sender (pdmesh's UcxTransport, with none of the receiver's
logic): it sends whatever bytes it is given as control messages and collects what comes back.
`exchange` sends one batch, aborts the well-formed requests it was asked to (so they do not
wait `room_wait_s` for a room that is never offered), and checks the rule of the transfer
protocol: every decodable TransferRequest gets exactly one TransferResponse with its
transfer id (a duplicate id on the link is refused ALREADY_EXISTS), carrying a typed failure
(a google.rpc.Status of a known code with an ErrorInfo whose reason is in the catalogue) unless it asked for the one room on offer with its
token and matching sizes; anything else (responses, trailers, aborts for unknown transfers,
undecodable bytes) is ignored without an answer and without breaking the link.
"""

from __future__ import annotations

import asyncio
import collections

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import strategies as st

from pdmesh.reasons import Reason
from pdmesh.transfer.v1 import transfer_pb2 as pb
from pdmesh.worker.transfer import wire as transfer_wire
from fuzz_messages import LAYOUTS, ROOMS, U32, U64, times, wire
from fuzz_oracle import count

#: google.rpc codes a refused transfer request may carry.
REFUSALS = {1: "CANCELLED", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
            6: "ALREADY_EXISTS", 9: "FAILED_PRECONDITION", 10: "ABORTED", 16: "UNAUTHENTICATED"}


def transfer_messages(room, token, layout) -> st.SearchStrategy[bytes]:
    """Control messages: requests (sometimes for the offered `room` with its `token` and
    `layout`), the other bodies with random ids, damaged messages, noise, nothing at all."""
    request = st.builds(
        pb.TransferRequest, transfer_id=st.integers(0, U64),
        room=st.one_of(st.just(room), ROOMS), epoch=st.one_of(st.integers(0, 9), st.integers(0, U64)),
        layout=st.one_of(st.just(layout), LAYOUTS), num_pages=st.one_of(st.integers(0, 3), st.integers(0, U32)),
        expected_bytes=st.one_of(st.integers(0, 4096), st.integers(0, U64)),
        layers_per_chunk=st.one_of(st.integers(0, 4), st.just(U32)),
        token=st.one_of(st.just(token), st.binary(max_size=80)))
    info = st.builds(error_details_pb2.ErrorInfo, reason=st.text(max_size=20), domain=st.text(max_size=8))
    detail = st.one_of(info, st.builds(error_details_pb2.RetryInfo)).map(_packed)
    failure = st.builds(status_pb2.Status, code=st.integers(-(1 << 31), (1 << 31) - 1),
                        message=st.text(max_size=20), details=st.lists(detail, max_size=2))
    others = st.one_of(
        st.builds(pb.TransferResponse, transfer_id=st.integers(0, U64), status=failure).map(
            lambda r: pb.TransferMessage(response=r)),
        st.builds(pb.TransferTrailer, transfer_id=st.integers(0, U64), first_token=st.integers(-5, 5),
                  byte_count=st.integers(0, U64), checksum=st.integers(0, U64)).map(
            lambda t: pb.TransferMessage(trailer=t)),
        st.builds(pb.TransferAbort, transfer_id=st.integers(0, U64), status=failure).map(
            lambda a: pb.TransferMessage(abort=a)))
    requests = request.map(lambda r: pb.TransferMessage(request=r))
    encoded = requests.map(lambda m: m.SerializeToString())
    return st.one_of(*times(encoded, 2), wire(requests), wire(others), st.sampled_from([b"", b"\x00" * 70_000]))


def _packed(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def parse(data: bytes) -> pb.TransferMessage | None:
    try:
        message = pb.TransferMessage.FromString(data)
    except Exception:  # noqa: BLE001 - the sender's decoder refuses it the same way
        return None
    return message if message.WhichOneof("body") else None


class RawPeer:
    """A bare UCX link to a sender; answers are kept by transfer id."""

    def __init__(self, link) -> None:
        self.link = link
        self.answers: dict[int, list[pb.TransferMessage]] = collections.defaultdict(list)
        self._arrived = asyncio.Event()
        link.on_control = self._on_control

    @classmethod
    async def connect(cls, transport, address: str) -> "RawPeer":
        return cls(await transport.connect(address, 5.0))

    def _on_control(self, data: bytes) -> None:
        message = pb.TransferMessage.FromString(data)
        body = getattr(message, message.WhichOneof("body"))
        self.answers[body.transfer_id].append(message)
        self._arrived.set()

    async def wait_for(self, wanted: collections.Counter, timeout: float) -> None:
        """Until each transfer id in `wanted` has at least that many responses, or `timeout`."""
        async def until() -> None:
            while any(self._responses(tid) < n for tid, n in wanted.items()):
                self._arrived.clear()
                await self._arrived.wait()
        try:
            await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            pass

    def _responses(self, tid: int) -> int:
        return sum(m.WhichOneof("body") == "response" for m in self.answers[tid])


def accepted_ok(request: pb.TransferRequest, room: int, token: bytes, layout, expected_bytes: int,
                num_pages: int, epoch: int) -> bool:
    """The one kind of request a sender may accept: the offered room, its token, its sizes."""
    return (request.room == room and request.token == token and request.layout == layout
            and request.num_pages == num_pages and request.expected_bytes == expected_bytes
            and request.epoch >= epoch and 1 <= request.layers_per_chunk <= layout.num_layers)


async def exchange(peer: RawPeer, batch: list[bytes], abort: list[bool], wait_s: float,
                   is_acceptable, rpc: str) -> int:
    """Send `batch`; check the sender's answers (see the module docstring); return how many
    requests it accepted."""
    peer.answers.clear()
    wanted: collections.Counter = collections.Counter()
    requests: list[pb.TransferRequest] = []
    for data in batch:
        await peer.link.send_control(data)
        message = parse(data)
        kind = message.WhichOneof("body") if message else "undecodable"
        count(rpc, kind)
        if kind == "request":
            wanted[message.request.transfer_id] += 1
            requests.append(message.request)
    for request, stop in zip(requests, abort):
        if stop:  # the receiver gives up at once: the sender must answer, not wait
            await peer.link.send_control(pb.TransferMessage(abort=pb.TransferAbort(
                transfer_id=request.transfer_id)).SerializeToString())
    await peer.wait_for(wanted, wait_s)
    accepted = 0
    for tid, n in wanted.items():
        responses = [m.response for m in peer.answers[tid] if m.WhichOneof("body") == "response"]
        assert len(responses) == n, f"transfer {tid:#x}: {n} requests, {len(responses)} responses"
        ok = [r for r in responses if not r.HasField("status")]
        mine = [q for q in requests if q.transfer_id == tid]
        assert len(ok) <= 1 and (not ok or any(is_acceptable(q) for q in mine)), \
            f"transfer {tid:#x} accepted: {mine}"
        accepted += len(ok)
        for r in responses:
            if r.HasField("status"):
                f = transfer_wire.failure_from_proto(r.status)
                assert r.status.code in REFUSALS and isinstance(f.reason, Reason) \
                    and f.code.value[0] == r.status.code, f"untyped refusal {r.status} of {mine}"
    assert not peer.link.closed, f"the sender broke the link: {peer.link.closed_error}"
    return accepted
