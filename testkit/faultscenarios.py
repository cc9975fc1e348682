"""The faults, one function each, run against a `faultkit.FaultMesh` (tests assert, the bench times).

Each scenario starts requests through the router, waits until they are where the fault should
hit (a KV transfer in flight, tokens streaming), injects the fault, and returns a `FaultRun`: when
the fault happened, the requests it should hit (`affected`) and those it should not (`others`),
each an `Outcome` with its end time. Recovery (a rank's restart, a new process) is left to the
caller, which also decides what to assert or measure.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from testkit.faultkit import FaultMesh, Outcome, await_line, request

PROMPT = "faults are survived"
LONG = 1500  # tokens: still streaming seconds after the first one, when the fault hits
TIMEOUT_S = 120.0  # every request's deadline: far beyond the 5 s detection bound, and long
# enough for LONG tokens to stream on a 2-core machine that other processes keep busy


@dataclass
class FaultRun:
    fault_at: float
    affected: list[Outcome] = field(default_factory=list)
    others: list[Outcome] = field(default_factory=list)

    @property
    def detection_s(self) -> list[float]:
        """Fault to typed status at the client, for each affected request that failed."""
        return [o.ended - self.fault_at for o in self.affected if not o.ok]


async def prefill_rank_mid_transfer(mesh: FaultMesh, n: int = 6) -> FaultRun:
    """SIGKILL prefill rank 0 while it sends a room's KV (rooms pinned to ranks 0 and 1 alternately)."""
    prefill = mesh.procs["prefill"]
    async with mesh.client() as client:
        since = len(prefill.lines)
        jobs = [asyncio.create_task(request(client, f"{PROMPT} {i}", max_new_tokens=4, routed_dp_rank=i % 2,
                                            timeout=TIMEOUT_S)) for i in range(n)]
        await await_line(prefill, "prefill[0]", "debug: packing", since=since)
        fault_at = mesh.kill_rank("prefill", 0)
        outcomes = await asyncio.gather(*jobs)
    return FaultRun(fault_at, outcomes[0::2], outcomes[1::2])


async def decode_rank_mid_stream(mesh: FaultMesh, n: int = 6) -> FaultRun:
    """SIGKILL decode rank 0 as soon as a request streams tokens from it. Affected: every request the
    rank held then (streaming, or not started there yet); the others stream from rank 1."""
    async with mesh.client() as client:
        on_rank0 = asyncio.Event()

        def seen(o: Outcome) -> None:
            if o.decode_rank == 0:
                on_rank0.set()
        jobs = [asyncio.create_task(request(client, f"{PROMPT} {i}", max_new_tokens=LONG, ignore_eos=True,
                                            on_first=seen, timeout=TIMEOUT_S)) for i in range(n)]
        await asyncio.wait_for(on_rank0.wait(), TIMEOUT_S)
        fault_at = mesh.kill_rank("decode", 0)
        outcomes = await asyncio.gather(*jobs)
    done_before = [o for o in outcomes if o.ok and o.ended <= fault_at]
    return FaultRun(fault_at, [o for o in outcomes if o.decode_rank != 1 and o not in done_before],
                    [o for o in outcomes if o.decode_rank == 1])


async def dropped_links(mesh: FaultMesh, side: str, n: int) -> FaultRun:
    """Close every UCX link of the `side` instance's ranks while each prefill rank sends a room."""
    prefill = mesh.procs["prefill"]
    async with mesh.client() as client:
        since = len(prefill.lines)
        jobs = [asyncio.create_task(request(client, f"{PROMPT} {side} {i}", max_new_tokens=4, routed_dp_rank=i % 2,
                                            timeout=TIMEOUT_S)) for i in range(n)]
        for rank in range(2):
            await await_line(prefill, f"prefill[{rank}]", "debug: packing", since=since)
        fault_at = mesh.drop_links(side)
        outcomes = await asyncio.gather(*jobs)
    return FaultRun(fault_at, [o for o in outcomes if not o.ok], [o for o in outcomes if o.ok])


async def router_killed(mesh: FaultMesh, n: int = 4) -> FaultRun:
    """SIGKILL the router while every request streams tokens (the caller starts a new one)."""
    async with mesh.client() as client:
        started = [asyncio.Event() for _ in range(n)]
        jobs = [asyncio.create_task(request(client, f"{PROMPT} {i}", max_new_tokens=LONG, ignore_eos=True,
                                            first_token=started[i], timeout=TIMEOUT_S)) for i in range(n)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), TIMEOUT_S)
        fault_at = mesh.kill("router")
        return FaultRun(fault_at, list(await asyncio.gather(*jobs)))


async def bootstrap_restarted(mesh: FaultMesh, n: int = 6) -> FaultRun:
    """SIGKILL the bootstrap service while lookup-path rooms are in flight; start it again on the same
    port at once. Requests that need it meanwhile fail typed; the others get through."""
    async with mesh.client() as client:
        jobs = [asyncio.create_task(request(client, f"{PROMPT} {i}", max_new_tokens=4, timeout=TIMEOUT_S))
                for i in range(n)]
        await asyncio.sleep(0.3)  # rooms registered, lookups waiting, KV waiting to be packed
        fault_at = mesh.kill("bootstrap")
        await asyncio.to_thread(mesh.start_part, "bootstrap")
        outcomes = await asyncio.gather(*jobs)
    return FaultRun(fault_at, [o for o in outcomes if not o.ok], [o for o in outcomes if o.ok])


async def prefill_instance_killed(mesh: FaultMesh, n: int = 4) -> FaultRun:
    """SIGKILL the prefill instance's whole process group while its KV is in flight."""
    prefill = mesh.procs["prefill"]
    async with mesh.client() as client:
        since = len(prefill.lines)
        jobs = [asyncio.create_task(request(client, f"{PROMPT} {i}", max_new_tokens=4, timeout=TIMEOUT_S))
                for i in range(n)]
        await await_line(prefill, "debug: packing", since=since)
        fault_at = mesh.kill("prefill")
        return FaultRun(fault_at, list(await asyncio.gather(*jobs)))
