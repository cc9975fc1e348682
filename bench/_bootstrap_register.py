"""The registration part of `bench bootstrap`: pdmesh's registrations beside SGLang's, same run.

Three servers of registrations, each in its own process on this machine, measured in alternating
rounds so that a shared machine's noise hits all alike:

- the registration stream (`BootstrapClient.register_room_streamed`, what a prefill rank uses);
- the unary `RegisterRoom` (grpcurl and simple callers), on the same bootstrap service;
- SGLang's bootstrap server, `POST /register_dp_rank` (`bench._sglang_bootstrap`: its routes
  re-created on aiohttp, with a keep-alive client).

Figures: p50 / p99 latency at 1 in flight, registrations/s at 1 and 64 in flight, and what a
request waits for: a register-then-lookup round (the prefill registers, then the decode asks:
sequential, the best case for SGLang's polling decode) and, for pdmesh, the time from the start of
a registration until a decode that already waits on its lookup stream knows the rank (the way a
decode meets a prefill that registers). The floors of the transports are measured beside them: an
empty message on a raw gRPC stream (no client library) and on the client's shared stream.

Every registration is of a fresh room (a retry would be cheaper).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time

from bench import _sglang_bootstrap as sglang
from bench import bootstrap as bb

ROOM_CAPACITY = 2_000_000
#: SGLang's figures quoted in issue 12 (an earlier run on this machine), for reference only.
SGLANG_QUOTED = {"p50_ms": 0.35, "c1_per_s": 2_831, "c64_per_s": 9_318}


def _register_ops(prefill, stub, sgl, rooms) -> dict:
    from pdmesh.bootstrap.v1 import bootstrap_pb2

    def stream(_i: int):
        room = next(rooms)
        return prefill.register_room_streamed(bb.INSTANCE, room, room % 8, f"room-{room}", timeout=5)

    def unary(_i: int):
        room = next(rooms)
        return stub.RegisterRoom(bootstrap_pb2.RegisterRoomRequest(
            instance_id=bb.INSTANCE, bootstrap_room=room, dp_rank=room % 8, request_id=f"room-{room}"),
            timeout=5)

    def sglang_register(_i: int):
        room = next(rooms)
        return sgl.register(room, room % 8)

    return {"stream": stream, "unary": unary, "sglang": sglang_register}


def _life_ops(prefill, rooms) -> dict:
    """A record's whole life on a prefill: registered, then removed once its transfer ended."""

    async def over_stream(_i: int) -> None:
        room = next(rooms)
        await prefill.register_room_streamed(bb.INSTANCE, room, room % 8, f"room-{room}", timeout=5)
        prefill.remove_room_streamed(room)  # rides on the stream's next message

    async def unary_removal(_i: int) -> None:  # how a prefill removed its records before
        room = next(rooms)
        await prefill.register_room_streamed(bb.INSTANCE, room, room % 8, f"room-{room}", timeout=5)
        await prefill.remove_room(room, timeout=5)

    return {"life_stream": over_stream, "life_unary_removal": unary_removal}


def _round_ops(prefill, decode, sgl, rooms) -> dict:
    """Register-then-lookup, each op returning the seconds a decode waited to know the rank."""

    async def pdmesh_sequential(_i: int) -> float:
        room = next(rooms)
        t = time.perf_counter()
        await prefill.register_room_streamed(bb.INSTANCE, room, room % 8, f"room-{room}", timeout=5)
        await decode.wait_for_room(room, 5)
        return time.perf_counter() - t

    async def pdmesh_waiting(_i: int) -> float:
        room = next(rooms)
        waiting = asyncio.ensure_future(decode.wait_for_room(room, 5))
        await decode.ping(5)  # the same stream, in order: the wait is at the service now
        t = time.perf_counter()
        registered = asyncio.ensure_future(
            prefill.register_room_streamed(bb.INSTANCE, room, room % 8, f"room-{room}", timeout=5))
        await waiting
        elapsed = time.perf_counter() - t
        await registered
        return elapsed

    async def sglang_sequential(_i: int) -> float:
        room = next(rooms)
        t = time.perf_counter()
        await sgl.register(room, room % 8)
        if str(room) not in await sgl.query([room]):
            raise RuntimeError(f"SGLang-style server lost room {room}")
        return time.perf_counter() - t

    return {"pdmesh_sequential": pdmesh_sequential, "pdmesh_waiting": pdmesh_waiting,
            "sglang_sequential": sglang_sequential}


async def _timed(op, n: int) -> list[float]:
    return [await op(i) for i in range(n)]


def _floor_ops(prefill, stub) -> dict:
    from pdmesh.bootstrap.v1 import bootstrap_pb2

    raw = stub.WatchRooms()  # the transport alone: one empty message written, its answer read
    empty = bootstrap_pb2.WatchRoomsRequest(tag=1)

    async def raw_stream(_i: int) -> None:
        await raw.write(empty)
        await raw.read()
    return {"raw_stream": raw_stream, "stream_empty": lambda i: prefill.ping(5)}, raw


async def measure(quick: bool) -> dict:
    from pdmesh.server.client import BootstrapClient

    n_lat, n_tp, rounds = (400, 4_000, 2) if quick else (3_000, 24_000, 6)
    proc, address, _ = bb.start_server(0, ROOM_CAPACITY)
    sproc, url = sglang.start()
    rooms = itertools.count(random.Random(bb.SEED + 2).randrange(1 << 61, 1 << 62))
    out: dict = {}
    try:
        async with BootstrapClient(address) as prefill, BootstrapClient(address) as decode:
            sgl = sglang.SglangClient(url)
            try:
                ops = _register_ops(prefill, prefill._stub, sgl, rooms)
                floors, raw = _floor_ops(prefill, prefill._stub)
                round_ops = _round_ops(prefill, decode, sgl, rooms)
                for _ in range(200):  # warm channels, streams, connections
                    for op in (*ops.values(), *floors.values()):
                        await op(0)
                    for op in round_ops.values():
                        await op(0)
                lat = await bb.alternate({**ops, **floors}, lambda op: bb.latency(op, n_lat // rounds), rounds)
                raw.cancel()
                out["lat"] = {k: [x for xs in v for x in xs] for k, v in lat.items()}
                rnd = await bb.alternate(round_ops, lambda op: _timed(op, n_lat // rounds), rounds)
                out["round"] = {k: [x for xs in v for x in xs] for k, v in rnd.items()}
                for conc in (1, 64):
                    per_round = n_tp // rounds // (8 if conc == 1 else 1)
                    tp = await bb.alternate(ops, lambda op: bb.throughput(op, per_round, conc), rounds)
                    out[f"c{conc}"] = {k: statistics.median(v) for k, v in tp.items()}
                life = {**_life_ops(prefill, rooms), "sglang": ops["sglang"]}
                tp = await bb.alternate(life, lambda op: bb.throughput(op, n_tp // rounds, 64), rounds)
                out["life"] = {k: statistics.median(v) for k, v in tp.items()}
            finally:
                await sgl.close()
    finally:
        bb.stop_server(proc)
        bb.stop_server(sproc)
    return out


def render(m: dict) -> str:
    p50 = {k: bb.pct(v, 0.5) for k, v in {**m["lat"], **m["round"]}.items()}
    p99 = {k: bb.pct(v, 0.99) for k, v in {**m["lat"], **m["round"]}.items()}
    c1, c64, life = m["c1"], m["c64"], m["life"]

    def lat_row(label: str, ours: str, theirs: str, unary: str = "") -> str:
        u = f"{p50[unary]:.3f} / {p99[unary]:.3f}" if unary else ""
        return (f"| {label} | {p50[ours]:.3f} / {p99[ours]:.3f} | {p50[theirs]:.3f} / {p99[theirs]:.3f} "
                f"| {p50[theirs] / p50[ours]:.2f}x | {u} |")

    def tp_row(conc: int, tp: dict) -> str:
        return (f"| registrations/s, {conc} in flight | {tp['stream']:,.0f} | {tp['sglang']:,.0f} "
                f"| {tp['stream'] / tp['sglang']:.2f}x | {tp['unary']:,.0f} |")

    rows = [
        "| registrations (same run) | pdmesh stream | SGLang HTTP | pdmesh / SGLang | pdmesh unary |",
        "| --- | ---: | ---: | ---: | ---: |",
        lat_row("p50 / p99 latency, 1 in flight (ms)", "stream", "sglang", "unary"),
        tp_row(1, c1),
        tp_row(64, c64),
        lat_row("register, then look up: p50 / p99 (ms)", "pdmesh_sequential", "sglang_sequential"),
        lat_row("register until a waiting decode knows the rank: p50 / p99 (ms)", "pdmesh_waiting",
                "sglang_sequential"),
        f"| a record's life, registered then removed, 64 in flight (records/s) "
        f"| {life['life_stream']:,.0f} | {life['sglang']:,.0f} | {life['life_stream'] / life['sglang']:.2f}x "
        f"| {life['life_unary_removal']:,.0f} (unary removal) |",
        f"| floor: empty message, raw gRPC stream / client's shared stream, p50 (ms) "
        f"| {p50['raw_stream']:.3f} / {p50['stream_empty']:.3f} | | | |",
    ]
    return ("\n".join(rows) + "\n\n"
            "Same run, same machine, alternating rounds. `pdmesh / SGLang` is SGLang's latency over "
            "pdmesh's (p50) or pdmesh's rate over SGLang's: above 1 pdmesh is faster. SGLang's server "
            "is its `/register_dp_rank` and `/query_dp_ranks` routes re-created on aiohttp "
            "(`bench/_sglang_bootstrap.py`) with a keep-alive client; SGLang's own prefill posts "
            "each registration on a new connection, which is slower. Its decode polls "
            "`/query_dp_ranks`, so its register-then-lookup row (asked at once after the "
            "registration) is its best case; a pdmesh decode already waits on its lookup stream, "
            "and the registration reaches it before the prefill has its answer (last latency "
            "row). A prefill removes its record once the room's transfer ended: over the stream, "
            "unanswered, riding on its next message (the life row; its last column removes with "
            "the unary RemoveRoom, as prefills did before); SGLang removes nothing (its records "
            "expire), so its column there is its registration alone. "
            "The unary row is for grpcurl and simple callers. At 1 in flight a registration "
            "costs one round trip of the stream, a few tens of us over the raw gRPC floor (the "
            "last row).\n")
