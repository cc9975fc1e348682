"""Two helpers shared by the services: `PdmeshError.from_status_proto` (a failure carried inside a
message body as a google.rpc.Status, e.g. the lookup stream's RoomError) and `grpcutil.run_async`."""

from __future__ import annotations

import asyncio

import pytest
from google.rpc import status_pb2

from pdmesh.errors import (FailedPrecondition, FollowBootstrapRoomConflict, NotFound, PdmeshError,
                           ResourceExhausted)
from pdmesh.grpcutil import run_async
from pdmesh.reasons import Reason


def test_from_status_proto_picks_the_class_by_reason_then_by_code():
    sent = FailedPrecondition("m", reason=Reason.FOLLOW_BOOTSTRAP_ROOM_CONFLICT, metadata={"a": 1})
    err = PdmeshError.from_status_proto(sent.to_status_proto())
    assert isinstance(err, FollowBootstrapRoomConflict) and err.metadata == {"a": "1"}
    sent = ResourceExhausted("m", reason=Reason.TOO_MANY_WAITERS, retry_after_s=0.5)
    err = PdmeshError.from_status_proto(sent.to_status_proto())
    assert isinstance(err, ResourceExhausted) and err.reason is Reason.TOO_MANY_WAITERS
    assert err.retry_after_s == 0.5
    err = PdmeshError.from_status_proto(status_pb2.Status(code=5, message="m"))  # no ErrorInfo
    assert isinstance(err, NotFound) and err.reason is Reason.NOT_FOUND
    assert type(PdmeshError.from_status_proto(status_pb2.Status(code=999, message="m"))) is PdmeshError


def test_a_foreign_reason_is_kept_as_its_string():
    err = PdmeshError.from_status_proto(NotFound("m", reason="SOMEONE_ELSES").to_status_proto())
    assert isinstance(err, NotFound) and err.reason == "SOMEONE_ELSES" and Reason.of(err.reason) is None


@pytest.mark.parametrize("loop", ["auto", "asyncio", "uvloop"])
def test_run_async_runs_on_the_chosen_loop(loop):
    async def main():
        return type(asyncio.get_running_loop()).__module__
    module = run_async(main(), loop)
    assert ("uvloop" in module) == (loop != "asyncio")


def test_run_async_rejects_unknown_loops():
    coro = asyncio.sleep(0)
    with pytest.raises(ValueError):
        run_async(coro, "trio")
    coro.close()
