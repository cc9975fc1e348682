"""The two helpers the bootstrap issue added to shared modules: `PdmeshError.from_parts` (errors
carried inside a message body, e.g. the lookup stream's RoomError) and `grpcutil.run_async`."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdmesh.errors import FollowBootstrapRoomConflict, NotFound, PdmeshError, ResourceExhausted
from pdmesh.grpcutil import run_async


def test_from_parts_picks_the_class_by_reason_then_by_code():
    err = PdmeshError.from_parts("FAILED_PRECONDITION", "m", "FOLLOW_BOOTSTRAP_ROOM_CONFLICT", {"a": 1})
    assert isinstance(err, FollowBootstrapRoomConflict) and err.metadata == {"a": "1"}
    err = PdmeshError.from_parts(grpc.StatusCode.RESOURCE_EXHAUSTED, "m", "TOO_MANY_WAITERS")
    assert isinstance(err, ResourceExhausted) and err.reason == "TOO_MANY_WAITERS"
    err = PdmeshError.from_parts("NOT_FOUND", "m")
    assert isinstance(err, NotFound) and err.reason == "NOT_FOUND"
    assert type(PdmeshError.from_parts("NO_SUCH_CODE", "m")) is PdmeshError


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
