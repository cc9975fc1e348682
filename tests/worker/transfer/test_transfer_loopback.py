"""Two real processes on loopback move KV over UCX (tcp, and shared memory) and over the
same-host path (the sender writes into the receiver's pool), and a sender dies mid-transfer.

One sender and one receiver process per path for the module (`python -m
pdmesh.worker.transfer.loopback`, the UCX settings set by pdmesh itself except UCX_TLS).
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

LAYOUT = "4,16,2,64,bf16"  # 4 KiB per page per layer: 32 KiB a page over K, V and 4 layers
PAGES = 1200
BULK = 1000  # pages of the room whose bytes are counted on the loopback interface (31 MiB)
TRANSPORTS = {
    "tcp": {"UCX_TLS": "tcp", "PDMESH_KV_TRANSFER_PATH": "ucx"},
    # pdmesh adds UCX_MM_ERROR_HANDLING=y itself
    "sm": {"UCX_TLS": "sm,self,tcp", "PDMESH_KV_TRANSFER_PATH": "ucx"},
    # control messages over tcp, every KV byte written straight into the receiver's pool
    "samehost": {"UCX_TLS": "tcp", "PDMESH_KV_TRANSFER_PATH": "auto"},
}


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


class Proc:
    """A loopback rank: JSON commands in, JSON events out (other stdout lines kept apart)."""

    def __init__(self, role: str, env: dict, *extra: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pdmesh.worker.transfer.loopback", role, "--pages", str(PAGES),
             "--layout", LAYOUT, "--room-wait", "3", "--grace", "3", *extra],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.events: queue.Queue = queue.Queue()
        self.other_lines: list[str] = []
        self.stash: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.wait("ready", timeout=60)

    def _read(self) -> None:
        for line in self.popen.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))
            else:
                self.other_lines.append(line)
        self.events.put({"event": "eof"})

    def send(self, **cmd) -> None:
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()

    def wait(self, event: str, timeout: float = 30, **match) -> dict:
        def fits(got: dict) -> bool:
            return got["event"] == event and all(got.get(k) == v for k, v in match.items())

        for i, got in enumerate(self.stash):
            if fits(got):
                return self.stash.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {event} {match} within {timeout} s")
            try:
                got = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if fits(got):
                return got
            if got["event"] == "eof":
                raise AssertionError(f"process ended while waiting for {event}")
            self.stash.append(got)  # kept for a later wait

    def collect(self, event: str, count: int, timeout: float = 60) -> list[dict]:
        return [self.wait(event, timeout=timeout) for _ in range(count)]

    def pool(self) -> dict:
        self.send(op="pool")
        return self.wait("pool")

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                self.send(op="exit")
                self.popen.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.kill()
                self.popen.wait()


@pytest.fixture(scope="module", params=sorted(TRANSPORTS))
def pair(request):
    env = dict(os.environ, **TRANSPORTS[request.param])
    loop = ("--loop", "uvloop") if request.param == "sm" else ()  # ranks may run on either loop
    sender, receiver = Proc("sender", env, *loop), Proc("receiver", env, *loop)
    yield request.param, env, sender, receiver
    sender.stop()
    receiver.stop()


def _offer(sender: Proc, rooms: list[int], pages: int) -> None:
    for room in rooms:
        sender.send(op="offer", room=room, pages=pages, fill=True, timeout=30)
    for _ in rooms:
        sender.wait("offered")


def test_many_rooms_at_once_every_byte_checked(pair):
    kind, _, sender, receiver = pair
    small, large = list(range(100, 124)), [200, 201]
    _offer(sender, small, 3)
    _offer(sender, large, 40)  # 1.25 MiB each, several chunks
    receiver.send(op="fetch", address=sender.ready["address"], rooms=small, pages=3, verify=True)
    receiver.send(op="fetch", address=sender.ready["address"], rooms=large, pages=40,
                  verify=True, layers_per_chunk=1)
    done = receiver.collect("fetch_done", len(small) + len(large))
    assert all(d["ok"] and d["verified"] for d in done), [d for d in done if not d["ok"]]
    assert {d["path"] for d in done} == {"samehost" if kind == "samehost" else "ucx"}
    offers = sender.collect("offer_done", len(small) + len(large))
    assert all(o["ok"] for o in offers)
    assert sender.pool()["free"] == PAGES and receiver.pool()["free"] == PAGES


def test_fragmented_pools_every_byte_checked(pair):
    """Both pools fragmented, differently (runs of every length up to 24 and 9 pages, single
    pages): the runs both sides share travel in place, the rest packed; every byte checked."""
    kind, _, sender, receiver = pair
    cases = {500: ({"max_run": 24}, {"max_run": 9}), 501: ({"scattered": True}, {}),
             502: ({}, {"scattered": True}), 503: ({"max_run": 3}, {"max_run": 40})}
    for room, (offer, _) in cases.items():
        sender.send(op="offer", room=room, pages=40, fill=True, timeout=30, **offer)
        sender.wait("offered")
    for room, (_, fetch) in cases.items():
        receiver.send(op="fetch", address=sender.ready["address"], rooms=[room], pages=40,
                      verify=True, **fetch)
    done = receiver.collect("fetch_done", len(cases))
    assert all(d["ok"] and d["verified"] for d in done), done
    assert all(o["ok"] for o in sender.collect("offer_done", len(cases)))
    assert sender.pool()["free"] == PAGES and receiver.pool()["free"] == PAGES


def _tcp_bytes_received(pid: int) -> int:
    """Bytes process `pid` has received over its open TCP sockets (`ss -tinp`: tcp_info's
    bytes_received per socket). Counted per process, so other traffic on the machine's loopback
    interface (another test run, a benchmark) does not count."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's line; its tcp_info follows, indented
            mine = f"pid={pid}," in line
        elif mine:
            found = re.search(r"\bbytes_received:(\d+)", line)
            total += int(found.group(1)) if found else 0
    return total


def test_shared_memory_really_carries_the_bytes(pair):
    """tcp moves the payload over the receiver's TCP sockets; shared memory and the same-host
    path must not (a silent fall-back to tcp, e.g. without UCX_MM_ERROR_HANDLING=y, would)."""
    kind, _, sender, receiver = pair
    _offer(sender, [250], BULK)
    before = _tcp_bytes_received(receiver.popen.pid)
    receiver.send(op="fetch", address=sender.ready["address"], rooms=[250], pages=BULK,
                  verify=True)
    done = receiver.wait("fetch_done", room=250, timeout=120)
    over_tcp = _tcp_bytes_received(receiver.popen.pid) - before
    sender.collect("offer_done", 1)
    assert done["ok"] and done["verified"], done
    payload = done["bytes"]
    if kind in ("sm", "samehost"):
        assert over_tcp < payload / 4, (over_tcp, payload)
    else:
        assert over_tcp >= payload, (over_tcp, payload)


def test_sender_killed_mid_transfer(pair):
    kind, env, healthy, receiver = pair
    shm_before = _shm()
    dying = Proc("sender", env, "--pack-delay", "0.5")
    try:
        dying.send(op="offer", room=300, pages=40, fill=True, timeout=60)
        dying.wait("offered")
        _offer(healthy, [301, 302, 303], 8)
        receiver.send(op="fetch", address=dying.ready["address"], rooms=[300], pages=40,
                      verify=True, timeout=60, layers_per_chunk=1)
        dying.wait("packing", timeout=30)
        receiver.send(op="fetch", address=healthy.ready["address"], rooms=[301, 302, 303],
                      pages=8, verify=True)
        dying.popen.kill()
        killed = time.monotonic()
        failed = receiver.wait("fetch_done", room=300, timeout=30)
        took = time.monotonic() - killed
        assert not failed["ok"] and failed["code"] == "UNAVAILABLE", failed
        print(f"dead sender noticed after {took:.2f} s ({kind})")
        assert took < 8, f"a dead sender was noticed after {took:.1f} s ({kind})"
        others = receiver.collect("fetch_done", 3)
        assert all(d["ok"] and d["verified"] for d in others), others
        healthy.collect("offer_done", 3)
        # the receiver keeps serving: another transfer from the healthy sender
        _offer(healthy, [304], 5)
        receiver.send(op="fetch", address=healthy.ready["address"], rooms=[304], pages=5,
                      verify=True)
        again = receiver.wait("fetch_done", room=304)
        assert again["ok"] and again["verified"]
        healthy.collect("offer_done", 1)
        assert receiver.pool()["free"] == PAGES and healthy.pool()["free"] == PAGES
        assert _shm() <= shm_before  # the killed writer left no shared segment behind
    finally:
        dying.popen.kill()
        dying.popen.wait()


def test_forced_ucx_and_same_host_links_in_one_mesh(pair):
    """One receiver fetches from a sender forced to UCX and from a same-host one at once; a
    receiver killed with -9 afterwards leaves nothing in /dev/shm (its pool is a memfd)."""
    kind, env, same_host, _ = pair
    if kind != "samehost":
        pytest.skip("one mesh of both paths is built once, from the same-host pair")
    shm_before = _shm()
    forced = Proc("sender", dict(env, PDMESH_KV_TRANSFER_PATH="ucx"))
    receiver = Proc("receiver", env)
    try:
        _offer(forced, [400, 401], 6)
        _offer(same_host, [402, 403], 6)
        for sender, rooms in ((forced, [400, 401]), (same_host, [402, 403])):
            receiver.send(op="fetch", address=sender.ready["address"], rooms=rooms, pages=6,
                          verify=True)
        done = {d["room"]: d for d in receiver.collect("fetch_done", 4)}
        assert all(d["ok"] and d["verified"] for d in done.values()), done
        assert [done[r]["path"] for r in (400, 401, 402, 403)] == ["ucx"] * 2 + ["samehost"] * 2
        forced.collect("offer_done", 2)
        same_host.collect("offer_done", 2)
        assert receiver.pool()["free"] == PAGES
        receiver.popen.kill()
        receiver.popen.wait()
        assert _shm() <= shm_before
    finally:
        forced.stop()
        receiver.popen.kill()
        receiver.popen.wait()


def test_many_fresh_links_at_once_lose_no_request(pair):
    """Issue 11: every room on a brand-new link that sends its request the instant it opens, 24 at
    once; the links are closed after each round, so the sender's next endpoints often get a closed
    one's UCX handle back. Every request is answered and every byte arrives, round after round."""
    _, _, sender, receiver = pair
    for round_ in range(4):
        rooms = list(range(9000 + 100 * round_, 9024 + 100 * round_))
        _offer(sender, rooms, 4)
        receiver.send(op="fetch", address=sender.ready["address"], rooms=rooms, pages=4, verify=True,
                      fresh_links=True, timeout=60)
        done = receiver.collect("fetch_done", len(rooms), timeout=90)
        receiver.wait("batch_done", timeout=30)
        assert all(d["ok"] and d["verified"] for d in done), [d for d in done if not d["ok"]]
        assert max(d["seconds"] for d in done) < 20, max(d["seconds"] for d in done)  # none waited out a bound
        sender.collect("offer_done", len(rooms), timeout=30)
    assert receiver.pool()["free"] == PAGES and sender.pool()["free"] == PAGES


def test_the_tools_set_flag_wins_over_depth_and_names_bad_items():
    """`--set FIELD=INT` overrides what `--depth` sets (it once raised a TypeError traceback for
    recv_window), and a bad item is a usage error naming it, not a traceback."""
    from types import SimpleNamespace

    from pdmesh.worker.transfer.loopback import transfer_config

    def config(*items):
        return transfer_config(SimpleNamespace(room_wait=5.0, grace=5.0, depth=2,
                                               kv_transfer_path="ucx", set=list(items)))

    got = config("recv_window=4", "send_window_bytes=33554432")
    assert (got.send_depth, got.recv_window, got.send_window_bytes) == (2, 4, 32 << 20)
    for item, words in (("bogus=1", "FIELD one of"), ("recv_window", "want FIELD=INT"),
                        ("recv_window=x", "not an integer"), ("recv_window=0", ">= 1")):
        with pytest.raises(ValueError, match=words):
            config(item)


@pytest.mark.parametrize("flagged", [("sender", "receiver"), ("sender",)])
def test_the_no_direct_checksum_experiment_zeroes_the_sums_of_pages_in_place(flagged):
    """`--no-direct-checksum` (the benchmark's measure of what summing costs): on both sides the
    transfer still moves every byte; on one side only, the trailer no longer matches (the flag
    really takes the sums of pages in place out)."""
    env = dict(os.environ, **TRANSPORTS["tcp"])
    procs = {role: Proc(role, env, *(["--no-direct-checksum"] if role in flagged else []))
             for role in ("sender", "receiver")}
    try:
        sender, receiver = procs["sender"], procs["receiver"]
        _offer(sender, [7], 100)  # one run of 400 KiB a layer and K/V: sent in place
        receiver.send(op="fetch", address=sender.ready["address"], rooms=[7], pages=100,
                      verify=True, layers_per_chunk=1)
        done = receiver.wait("fetch_done")
        if len(flagged) == 2:
            assert done["ok"] and done["verified"], done
        else:
            assert not done["ok"] and done["reason"] == "KV_TRANSFER_CORRUPT", done
        assert receiver.pool()["free"] == PAGES
    finally:
        for proc in procs.values():
            proc.stop()
