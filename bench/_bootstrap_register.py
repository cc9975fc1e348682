"""The registration part of `bench bootstrap`: RegisterRoom (unary) beside the registration stream
(`BootstrapClient.register_room_streamed`, what a prefill rank uses), 1 and 64 in flight.

Every registration is of a fresh room (a retry would be cheaper), on a bootstrap service in its own
process (`bench.bootstrap serve`). Rounds alternate between the two calls and the empty-RPC
baselines of each transport (health Check, an empty message on the lookup stream), so a shared
machine's noise hits all alike. SGLang's figures are quoted (its aiohttp bootstrap server, PUT
/route per registration, measured on this machine), not re-measured here.
"""

from __future__ import annotations

import itertools
import random
import statistics

from bench import bootstrap as bb

#: SGLang's HTTP bootstrap server, registrations (quoted in issue 12).
SGLANG = {"p50_ms": 0.35, "c1_per_s": 2_831, "c64_per_s": 9_318}
#: pdmesh's unary RegisterRoom measured beside them (issue 12): the bridge to this run's machine.
UNARY_BESIDE_SGLANG = {"p50_ms": 0.57, "c1_per_s": 1_671, "c64_per_s": 3_958}
ROOM_CAPACITY = 2_000_000


def _ops(client, stub, health, check, rooms) -> dict:
    from pdmesh.bootstrap.v1 import bootstrap_pb2

    def unary(_i: int):
        room = next(rooms)
        return stub.RegisterRoom(bootstrap_pb2.RegisterRoomRequest(
            instance_id=bb.INSTANCE, bootstrap_room=room, dp_rank=room % 8, request_id=f"room-{room}"),
            timeout=5)

    def stream(_i: int):
        room = next(rooms)
        return client.register_room_streamed(bb.INSTANCE, room, room % 8, f"room-{room}", timeout=5)

    return {"unary_register": unary, "stream_register": stream,
            "unary_empty": lambda i: health.Check(check, timeout=5), "stream_empty": lambda i: client.ping(5)}


async def measure(quick: bool) -> dict:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdmesh.server.client import BootstrapClient

    n_lat, n_tp, rounds = (400, 4_000, 2) if quick else (4_000, 40_000, 6)
    proc, address, _ = bb.start_server(0, ROOM_CAPACITY)
    rooms = itertools.count(random.Random(bb.SEED + 2).randrange(1 << 61, 1 << 62))
    out: dict = {}
    try:
        async with BootstrapClient(address) as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            ops = _ops(client, client._stub, health, health_pb2.HealthCheckRequest(), rooms)
            for _ in range(200):  # warm the channel and both streams
                for op in ops.values():
                    await op(0)
            lat = await bb.alternate(ops, lambda op: bb.latency(op, n_lat // rounds), rounds)
            out["lat"] = {k: [x for xs in v for x in xs] for k, v in lat.items()}
            for conc in (1, 64):
                per_round = n_tp // rounds // (8 if conc == 1 else 1)
                tp = await bb.alternate(ops, lambda op: bb.throughput(op, per_round, conc), rounds)
                out[f"c{conc}"] = {k: statistics.median(v) for k, v in tp.items()}
    finally:
        bb.stop_server(proc)
    return out


def render(m: dict) -> str:
    p50 = {k: bb.pct(v, 0.5) for k, v in m["lat"].items()}
    p99 = {k: bb.pct(v, 0.99) for k, v in m["lat"].items()}
    c1, c64 = m["c1"], m["c64"]
    u, s = "unary_register", "stream_register"
    # SGLang's figures were taken beside pdmesh's unary RegisterRoom (UNARY_BESIDE_SGLANG); this
    # run's unary figure, on this run's machine, scales the stream's figure to that machine.
    lat_scaled = p50[s] * UNARY_BESIDE_SGLANG["p50_ms"] / p50[u]
    rows = [
        "| registrations | unary RegisterRoom | registration stream | stream / unary | empty unary / "
        "stream RPC (baselines) | SGLang HTTP (quoted) | unary beside SGLang (quoted) | stream / SGLang, "
        "scaled by the unary |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| p50 / p99 latency, 1 in flight (ms) | {p50[u]:.3f} / {p99[u]:.3f} | {p50[s]:.3f} / {p99[s]:.3f} "
        f"| {p50[u] / p50[s]:.2f}x faster | {p50['unary_empty']:.3f} / {p50['stream_empty']:.3f} "
        f"| {SGLANG['p50_ms']:.2f} | {UNARY_BESIDE_SGLANG['p50_ms']:.2f} "
        f"| {SGLANG['p50_ms'] / lat_scaled:.2f}x faster |",
    ]
    for conc, tp in ((1, c1), (64, c64)):
        key = f"c{conc}_per_s"
        scaled = tp[s] * UNARY_BESIDE_SGLANG[key] / tp[u]
        rows.append(f"| registrations/s, {conc} in flight | {tp[u]:,.0f} | {tp[s]:,.0f} | {tp[s] / tp[u]:.2f}x "
                    f"| {tp['unary_empty']:,.0f} / {tp['stream_empty']:,.0f} | {SGLANG[key]:,} "
                    f"| {UNARY_BESIDE_SGLANG[key]:,} | {scaled / SGLANG[key]:.2f}x |")
    return ("\n".join(rows) + "\n\n"
            "Each registration is of a fresh room. The stream rows use `BootstrapClient."
            "register_room_streamed`: one stream per bootstrap address and process; registrations "
            "made while a write is in flight go out together in the next message. SGLang's figures "
            "were measured beside pdmesh's unary RegisterRoom on a machine of this kind; the last "
            "column compares the stream with SGLang on that run's machine: the stream's figure "
            "times (unary beside SGLang / unary in this run). At 1 in flight a registration is one "
            "round trip of the stream, as fast as an empty message on it (the baseline column): "
            "the gRPC stream's round trip, not the registration, bounds that row.\n")
