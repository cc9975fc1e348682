"""A prefill rank computes a room while the room's registration is in flight (`prefill_rank._beside`).

A registration that fails stops the compute and its typed error is the request's and the
offer's: the offer is failed with it before the compute is cancelled, so a decode already
fetching the room (its record was durable at a bootstrap service that died before answering)
gets UNAVAILABLE, not a cancellation (seen once in tests/faults' bootstrap restart). Work that
ends first ends the request as it ended, and a registration that succeeds aborts nothing.
"""

from __future__ import annotations

import asyncio

import pytest

from pdmesh.errors import Unavailable
from pdmesh.reasons import Reason
from pdmesh.worker.rank.prefill_rank import _beside


def _down() -> Unavailable:
    return Unavailable("the bootstrap service cannot be reached", reason=Reason.BOOTSTRAP_UNAVAILABLE)


def test_a_failed_registration_fails_the_offer_with_its_error_then_stops_the_compute():
    async def go():
        events, computing = [], asyncio.Event()

        async def work():
            computing.set()
            try:
                await asyncio.Event().wait()  # computes until stopped
            except asyncio.CancelledError:
                events.append("compute stopped")
                raise

        async def register():
            await computing.wait()
            raise _down()

        registration = asyncio.ensure_future(register())
        with pytest.raises(Unavailable) as raised:
            await _beside(registration, work(), lambda err: events.append(("offer failed", err)))
        assert raised.value is registration.exception()
        assert events == [("offer failed", registration.exception()), "compute stopped"]

    asyncio.run(go())


@pytest.mark.parametrize("registration_fails", [False, True])
def test_work_that_ends_first_ends_the_request_and_aborts_nothing(registration_fails):
    async def go():
        aborted, done = [], asyncio.Event()

        async def work():
            return "first token", 1.0, 2.0

        async def register():
            await done.wait()
            if registration_fails:
                raise _down()

        registration = asyncio.ensure_future(register())
        task = _beside(registration, work(), aborted.append)
        result = await task
        done.set()
        await asyncio.wait([registration])
        assert (registration.exception() is not None) == registration_fails  # left to its owner
        assert result == ("first token", 1.0, 2.0)
        assert aborted == []

    asyncio.run(go())
