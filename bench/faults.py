"""Failure detection times: from a fault to the typed status at the client, for each kind of fault.

One `testkit.faultkit.FaultMesh` (bootstrap, prefill dp 2, decode dp 2, router; real processes,
every KV chunk packed 1 s late so a kill lands mid-transfer) takes each fault of
`testkit.faultscenarios` a few times over, recovering in between (the controller restarts a rank,
a new router / bootstrap / prefill process starts on the same address). For each fault the table
gives the requests it hit, the detection time (fault -> the client's typed status) at p50 and
max, the statuses seen, and the ratio to the baseline measured in the same mesh: the end-to-end
time of a healthy request (which includes the same 1 s pack delay). The design bound is 5 s; the
requests' own deadline is 60 s, so a detection by deadline would show as ~60 s.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time

from testkit import faultscenarios as sc
from testkit.faultkit import FaultMesh, request, wait_until

BOUND_S = 5.0


def _recover_ranks(mesh: FaultMesh) -> None:
    if not mesh.settled(120):
        raise RuntimeError("the mesh did not settle after a fault:\n" + mesh.procs["prefill"].tail())


def _restart(name: str):
    def recover(mesh: FaultMesh) -> None:
        mesh.start_part(name)
        _recover_ranks(mesh)
        if not wait_until(lambda: asyncio.run(_one(mesh)).ok, 30, interval=0.5):  # the router sees it
            raise RuntimeError(f"requests fail after the {name} came back")
    return recover


async def _one(mesh: FaultMesh):
    async with mesh.client() as client:
        return await request(client, f"{sc.PROMPT} probe", max_new_tokens=2, timeout=sc.TIMEOUT_S)


FAULTS = [  # (name, scenario, recovery)
    ("prefill rank killed mid-transfer", sc.prefill_rank_mid_transfer, _recover_ranks),
    ("decode rank killed mid-stream", sc.decode_rank_mid_stream, _recover_ranks),
    ("router killed (restarted on its port)", sc.router_killed, _restart("router")),
    ("bootstrap service killed and restarted", sc.bootstrap_restarted, _recover_ranks),
    ("UCX links dropped by the prefill", lambda m: sc.dropped_links(m, "prefill", 6), _recover_ranks),
    ("prefill instance killed (process group)", sc.prefill_instance_killed, _restart("prefill")),
]


async def _healthy(mesh: FaultMesh, n: int) -> list[float]:
    async with mesh.client() as client:
        times = []
        for i in range(n):
            o = await request(client, f"{sc.PROMPT} baseline {i}", max_new_tokens=4, timeout=sc.TIMEOUT_S)
            if not o.ok:
                raise RuntimeError(f"a healthy request failed: {o.error}")
            times.append(o.ended - o.started)
        return times


def measure(reps: int) -> tuple[dict, list[float]]:
    mesh = FaultMesh("bench-faults", pack_delay_s=1.0).start()
    found = {name: {"times": [], "affected": 0, "codes": collections.Counter(), "broken": []}
             for name, _, _ in FAULTS}
    try:
        baseline = asyncio.run(_healthy(mesh, 3))
        for _ in range(reps):
            for name, scenario, recover in FAULTS:
                row = found[name]
                try:
                    run = asyncio.run(asyncio.wait_for(scenario(mesh), 2 * sc.TIMEOUT_S))
                    recover(mesh)
                except Exception as exc:  # noqa: BLE001 - reported in the table; a fresh mesh goes on
                    row["broken"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                    mesh.stop()
                    mesh = FaultMesh("bench-faults", pack_delay_s=1.0).start()
                    continue
                row["times"] += run.detection_s
                row["affected"] += len(run.affected)
                row["codes"].update(f"{o.code} {o.error.reason}" for o in run.affected if not o.ok)
                time.sleep(0.5)
        baseline += asyncio.run(_healthy(mesh, 3))
    finally:
        mesh.stop()
    return found, baseline


def run(args) -> str:
    reps = 2 if args.quick else 5
    found, baseline = measure(reps)
    base = statistics.median(baseline)
    lines = [f"Fault to typed status at the client, {reps} runs of each fault (real processes, loopback, "
             f"2-core box; healthy request end to end: {base:.2f} s p50, the baseline of the ratio). "
             f"Design bound {BOUND_S:.0f} s; the requests' deadline is {sc.TIMEOUT_S:.0f} s.", "",
             "| fault | requests hit | detection p50 (s) | max (s) | p50 / healthy request | statuses |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, _, _ in FAULTS:
        row = found[name]
        times = row["times"]
        if not times:
            broken = f"{len(row['broken'])} run(s) did not complete: {row['broken'][0]}" if row["broken"] else "none failed"
            lines.append(f"| {name} | {row['affected']} | - | - | - | {broken} |")
            continue
        p50 = statistics.median(times)
        codes = ", ".join(f"{code} ({n})" for code, n in row["codes"].most_common())
        if row["broken"]:
            codes += f"; {len(row['broken'])} run(s) did not complete: {row['broken'][0]}"
        lines.append(f"| {name} | {row['affected']} | {p50:.2f} | {max(times):.2f} | {p50 / base:.2f} | {codes} |")
    return "\n".join(lines) + "\n"
