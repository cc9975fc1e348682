"""Per-transfer state: monotone, failure wins, a deadline on every non-terminal state.

    BOOTSTRAPPING -> WAITING_FOR_INPUT -> TRANSFERRING -> SUCCESS
          \\_______________\\____________________\\______-> FAILED

A state only moves forward (skipping is allowed); FAILED can be entered from any non-terminal
state and SUCCESS only from TRANSFERRING; a terminal state never changes, so when a failure and
the last step race, whichever the event loop runs first is final and a failure that arrives
before success is declared always wins. Entering a state arms a timer at
min(overall deadline, now + that state's timeout); when it fires the transfer FAILS with
DEADLINE_EXCEEDED naming the state, so nothing waits without end.

`failed` is an asyncio future that resolves (with the error) the moment the transfer fails, so
the code driving a transfer can race every await against it (`await status.guard(aw)`), and
`on_fail` callbacks run at once (abort the peer, stop packing).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pdmesh.errors import DeadlineExceeded, Internal, PdmeshError
from pdmesh.reasons import Reason

log = logging.getLogger(__name__)
T = TypeVar("T")


class TransferState(enum.IntEnum):
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4
    FAILED = 5

    @property
    def terminal(self) -> bool:
        return self >= TransferState.SUCCESS


class TransferStatus:
    """The state of one transfer, with its deadlines."""

    def __init__(self, name: str, timeout_s: float, state_timeouts: dict[TransferState, float],
                 state: TransferState = TransferState.BOOTSTRAPPING) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout_s
        self._state_timeouts = state_timeouts
        self.state = state
        self.error: PdmeshError | None = None
        self.failed: asyncio.Future[PdmeshError] = self._loop.create_future()
        self._on_fail: list[Callable[[PdmeshError], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def remaining(self) -> float:
        return max(0.0, self._deadline - self._loop.time())

    def on_fail(self, callback: Callable[[PdmeshError], None]) -> None:
        self._on_fail.append(callback)

    def advance(self, state: TransferState) -> bool:
        """Move forward to `state` (not FAILED: use fail()); False if terminal or not forward."""
        if self.terminal or state <= self.state or state == TransferState.FAILED:
            return False
        if state == TransferState.SUCCESS and self.state != TransferState.TRANSFERRING:
            raise Internal(f"transfer {self.name}: SUCCESS from {self.state.name}")
        self.state = state
        self._arm()
        return True

    def rebound(self, seconds: float) -> None:
        """Give the current state a new bound: min(overall deadline, now + `seconds`)."""
        if not self.terminal:
            self._arm(seconds)

    def succeed(self) -> bool:
        return self.advance(TransferState.SUCCESS)

    def fail(self, error: PdmeshError) -> bool:
        """Enter FAILED with `error` unless already terminal; run the on_fail callbacks."""
        if self.terminal:
            return False
        self.state, self.error = TransferState.FAILED, error
        self._cancel_timer()
        self.failed.set_result(error)
        for callback in self._on_fail:
            try:
                callback(error)
            except Exception:  # a callback must not stop the others
                log.exception("transfer %s: on_fail callback raised", self.name)
        return True

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` unless the transfer fails first (then raise its error). The
        awaitable is NOT cancelled on failure: in-flight UCX requests must run to their end."""
        if self.error is not None:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never started: no "coroutine was never awaited" warning
            raise self.error
        future = asyncio.ensure_future(awaitable)
        if future.done():  # a layer wait that is already met: no wait set-up (a GPU's hot path)
            return future.result()
        future.add_done_callback(_consume)
        await asyncio.wait({future, self.failed}, return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        raise self.error  # type: ignore[misc]

    def _arm(self, limit: float | None = None) -> None:
        self._cancel_timer()
        if self.terminal:
            return
        if limit is None:
            limit = self._state_timeouts.get(self.state)
        at = self._deadline if limit is None else min(self._deadline, self._loop.time() + limit)
        self._timer = self._loop.call_at(at, self._expire, self.state)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, state: TransferState) -> None:
        if self.state == state:
            log.warning("KV transfer %s: %s past its bound, failing it", self.name, state.name)
            self.fail(DeadlineExceeded(
                f"KV transfer {self.name} stayed {state.name} past its bound; the peer is "
                "slow, overloaded or gone", reason=Reason.KV_TRANSFER_DEADLINE_EXCEEDED,
                metadata={"state": state.name}))


def _consume(future: asyncio.Future) -> None:
    """Mark a guarded awaitable's exception as seen (its owner reports the transfer's error)."""
    if not future.cancelled():
        future.exception()
