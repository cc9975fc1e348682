"""Fresh meshes: N brand-new meshes, M requests each, sent the moment the mesh is up.

What issue 11 measured by hand: on a fresh mesh every UCX link is new, so a control message lost
while a link opens (or on a link that got a closed one's UCX handle back) shows up here as a
request that runs to its deadline. Each mesh (`testkit.faultkit.FaultMesh`: bootstrap, prefill dp 2,
decode dp 2, router; real processes on loopback) alternates the prefill's policy between
round_robin (every unpinned room is looked up) and follow_bootstrap_room (fast path), and gets a
mix of plain, pinned (`routed_dp_rank`) and n=2 requests, `--in-flight` at a time, each with a
`--deadline-s` deadline. A request that ends DEADLINE_EXCEEDED at (or past) 95% of its deadline
counts as hung; any other failure is typed and counted by code and reason.

    python -m bench.fresh --meshes 30 --requests 50      # the issue's experiment
    python -m bench fresh [--quick]                      # as a `make bench` part (README table)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time

from testkit.faultkit import FaultMesh, Outcome, request

POLICIES = (["--load-balance-method", "round_robin"], ["--load-balance-method", "follow_bootstrap_room"])


async def _requests(mesh: FaultMesh, m: int, in_flight: int, deadline_s: float) -> list[Outcome]:
    gate = asyncio.Semaphore(in_flight)

    async def one(client, i: int) -> Outcome:
        kind = i % 3
        kwargs = {"routed_dp_rank": i % 2} if kind == 1 else {"n": 2} if kind == 2 else {}
        async with gate:
            return await request(client, f"fresh mesh request {i}", max_new_tokens=4,
                                 timeout=deadline_s, **kwargs)

    async with mesh.client() as client:
        return await asyncio.gather(*(one(client, i) for i in range(m)))


def measure(meshes: int, m: int, in_flight: int, deadline_s: float, log=print) -> dict:
    found = {"outcomes": [], "hung_meshes": 0, "failed_starts": 0}
    for k in range(meshes):
        mesh = FaultMesh(f"fresh{k}", pack_delay_s=0.0)
        mesh.prefill_policy = list(POLICIES[k % 2])
        try:
            mesh.start()
        except Exception as exc:  # noqa: BLE001 - reported, the next mesh goes on
            found["failed_starts"] += 1
            log(f"mesh {k}: did not start: {exc}")
            continue
        try:
            outcomes = asyncio.run(_requests(mesh, m, in_flight, deadline_s))
        finally:
            mesh.stop()
        hung = [o for o in outcomes if _hung(o, deadline_s)]
        found["hung_meshes"] += bool(hung)
        found["outcomes"] += outcomes
        log(f"mesh {k + 1}/{meshes} ({mesh.prefill_policy[-1]}): {sum(o.ok for o in outcomes)} ok, "
            f"{len(hung)} hung, {sum(not o.ok for o in outcomes) - len(hung)} typed failures")
    return found


def _hung(o: Outcome, deadline_s: float) -> bool:
    return o.code == "DEADLINE_EXCEEDED" and o.ended - o.started >= 0.95 * deadline_s


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values or [0.0])[0]


def report(found: dict, meshes: int, m: int, in_flight: int, deadline_s: float) -> str:
    outcomes = found["outcomes"]
    hung = [o for o in outcomes if _hung(o, deadline_s)]
    typed = collections.Counter(f"{o.code} {o.error.reason}" for o in outcomes
                                if not o.ok and not _hung(o, deadline_s))
    ok = [o.ended - o.started for o in outcomes if o.ok]
    lines = [f"{meshes} fresh meshes x {m} requests (plain, pinned, n=2; {in_flight} in flight, "
             f"{deadline_s:.0f} s deadline), sent as soon as each mesh is up; real processes, loopback.",
             "",
             "| meshes | requests | ok | hung (ran to the deadline) | meshes with a hang | typed failures "
             "| ok latency p50 (s) | p99 (s) | max (s) |",
             "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
             f"| {meshes - found['failed_starts']} | {len(outcomes)} | {len(ok)} | {len(hung)} | "
             f"{found['hung_meshes']} | {', '.join(f'{k} ({n})' for k, n in typed.items()) or 'none'} | "
             f"{_pct(ok, 50):.3f} | {_pct(ok, 99):.3f} | {max(ok, default=0):.3f} |"]
    if found["failed_starts"]:
        lines.append(f"\n{found['failed_starts']} mesh(es) did not start.")
    return "\n".join(lines) + "\n"


def run(args) -> str:
    meshes, m = (4, 30) if args.quick else (30, 50)
    found = measure(meshes, m, 10, 20.0, log=lambda s: print(s, file=sys.stderr, flush=True))
    return report(found, meshes, m, 10, 20.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fresh", description=__doc__.splitlines()[0])
    p.add_argument("--meshes", type=int, default=30)
    p.add_argument("--requests", type=int, default=50, help="requests per mesh")
    p.add_argument("--in-flight", type=int, default=10)
    p.add_argument("--deadline-s", type=float, default=20.0)
    a = p.parse_args(argv)
    started = time.monotonic()
    found = measure(a.meshes, a.requests, a.in_flight, a.deadline_s)
    print(report(found, a.meshes, a.requests, a.in_flight, a.deadline_s))
    print(f"({time.monotonic() - started:.0f} s)")
    hung = sum(_hung(o, a.deadline_s) for o in found["outcomes"])
    return 1 if hung or found["failed_starts"] else 0


if __name__ == "__main__":
    sys.exit(main())
