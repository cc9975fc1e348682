"""A mesh of real processes to break on purpose, shared by the fault tests and `bench/faults.py`.

`FaultMesh` starts a bootstrap service, one prefill, one decode (dp 2 each) and a router as
`pdmesh` subprocesses on fixed free ports (so each can be restarted on the same address), with the
rank fault hooks on (`worker/rank/debug_faults.py`: every KV chunk is packed `pack_delay_s` late, so a
transfer is really in flight when something dies; SIGUSR1 drops a rank's UCX links). It knows
how to find a rank's pid, kill or restart each part, read instance status and process memory.
`request` runs one request through the router and records how it ended (`Outcome`): its tokens,
its typed error, and when it ended, so a fault's detection time is `outcome.ended - kill time`.

Nothing here asserts: tests assert on what it returns, the benchmark reports it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import grpc

from pdmesh.errors import PdmeshError
from testkit.proc import Proc
from pdmesh.router.client import RouterClient
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc

RANK_MODULE = "pdmesh.worker.rank"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    """How one request through the router ended."""

    prompt: str = ""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    error: PdmeshError | None = None
    started: float = 0.0
    ended: float = 0.0
    first_token_at: float | None = None
    prefill_rank: int | None = None
    decode_rank: int | None = None
    path: int = 0  # common.v1.RankPath
    prefill_instance: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def code(self) -> str:
        return "OK" if self.error is None else self.error.code.name


async def request(client: RouterClient, prompt, *, first_token: asyncio.Event | None = None,
                  on_first=None, timeout: float = 60.0, **kwargs) -> Outcome:
    """One request through the router, streamed; never raises a PdmeshError (it is recorded).
    `first_token` is set, and `on_first(outcome)` called, when the first token arrives."""
    out = Outcome(prompt=prompt if isinstance(prompt, str) else "", started=time.monotonic())
    try:
        async for message in client.stream(prompt, timeout=timeout, **kwargs):
            if message.HasField("info"):
                routing = message.info.routing
                out.prefill_rank, out.decode_rank = routing.prefill_dp_rank, routing.decode_dp_rank
                out.path = routing.rank_path
                out.prefill_instance = message.info.prefill_instance
            if message.token_ids and out.first_token_at is None:
                out.first_token_at = time.monotonic()
                if first_token is not None:
                    first_token.set()
                if on_first is not None:
                    on_first(out)
            out.tokens.extend(message.token_ids)
            out.text += message.text
    except PdmeshError as err:
        out.error = err
    out.ended = time.monotonic()
    return out


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def rank_pids(controller_pid: int) -> dict[int, int]:
    """dp_rank -> pid of the live rank processes of an instance (read from their command lines)."""
    ranks = {}
    for pid in children(controller_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if RANK_MODULE in argv:
            config = json.loads(argv[argv.index(RANK_MODULE) + 1])
            ranks[config["dp_rank"]] = pid
    return ranks


def rss_kib(pid: int, field: str = "RssAnon") -> int:
    """Resident memory of one process, in KiB: by default its private anonymous memory (RssAnon:
    heap, where a leak grows), not VmRSS, which also counts shared mappings as they get touched
    (a prefill rank that writes into a decode's shared pool maps it whole)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def instance_status(address: str, timeout: float = 10.0) -> worker_pb2.GetInstanceStatusResponse:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.InstanceServiceStub(channel).GetInstanceStatus(
            worker_pb2.GetInstanceStatusRequest(), timeout=timeout)


def settled(address: str, dp_size: int | None = None) -> bool:
    """Every rank alive, idle and with its whole pool free (False while unreachable)."""
    try:
        status = instance_status(address, timeout=5.0)
    except grpc.RpcError:
        return False
    ranks = list(status.ranks)
    return (len(ranks) == (dp_size or len(ranks)) and all(
        r.alive and r.active_requests == 0 and r.free_pages == r.total_pages > 0 for r in ranks))


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


async def await_line(proc: Proc, *needles: str, since: int = 0, timeout: float = 30.0) -> float:
    """Wait until `proc` printed a line (after line `since`) holding every needle; when it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(all(n in line for n in needles) for line in proc.lines[since:]):
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{proc.name} printed no line with {needles} within {timeout:.0f}s:\n{proc.tail()}")


class FaultMesh:
    """bootstrap + prefill (dp 2, round_robin: unpinned rooms take the lookup path) + decode (dp 2)
    + router, each on a fixed port of its own, with the rank fault hooks on."""

    def __init__(self, tag: str = "faults", *, pack_delay_s: float = 1.0, num_pages: int = 640) -> None:
        # 640 pages a rank: the scenarios stream LONG tokens for up to 6 requests, which the
        # decode may place 3 to a rank (3 x 1,500 tokens of 16-token pages = 282 pages)
        self.tag = tag
        self.ports = {name: free_port() for name in ("bootstrap", "prefill", "decode", "router")}
        self.addr = {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
        hooks = {"PDMESH_DEBUG_FAULTS": "1"}
        self.prefill_env = {**hooks, "PDMESH_DEBUG_PACK_DELAY_S": str(pack_delay_s)}
        # one chunk per transfer (the pack delay is per chunk; the tiny model's 4 layers would
        # otherwise be 4 chunks, each delayed, under layer streaming's chunking)
        self.decode_env = {**hooks, "PDMESH_KV_MIN_CHUNKS": "1"}
        self.num_pages = num_pages
        #: The prefill's policy flags, read at each (re)start: change them to replace the prefill
        #: with another policy under the same instance id.
        self.prefill_policy: list[str] = ["--load-balance-method", "round_robin"]
        #: Extra router flags (read at each (re)start).
        self.router_args: list[str] = []
        self.procs: dict[str, Proc] = {}

    def _proc(self, name: str) -> Proc:
        port, boot = str(self.ports[name]), self.addr["bootstrap"]
        pages = ["--num-pages", str(self.num_pages)]
        argv = {
            "bootstrap": ["bootstrap", "--port", port],
            "prefill": ["prefill", "--port", port, "--instance-id", f"{self.tag}-p", "--dp-size", "2",
                        *self.prefill_policy, "--bootstrap-addr", boot, *pages],
            "decode": ["decode", "--port", port, "--instance-id", f"{self.tag}-d", "--dp-size", "2", *pages],
            "router": ["router", "--port", port, "--prefill", self.addr["prefill"],
                       "--decode", self.addr["decode"], *self.router_args],
        }[name]
        env = {"prefill": self.prefill_env, "decode": self.decode_env}.get(name)
        count = sum(1 for p in self.procs.values() if p.name.startswith(f"{self.tag}-{name}"))
        return Proc(f"{self.tag}-{name}-{count}", argv, env=env)

    def start(self) -> "FaultMesh":
        try:
            self.start_part("bootstrap")
            for name in ("prefill", "decode"):
                self.procs[name] = self._proc(name).start()
            for name in ("prefill", "decode"):
                self.procs[name].wait_ready(180)
            self.start_part("router")
        except BaseException:
            self.stop()
            raise
        return self

    def start_part(self, name: str) -> Proc:
        """(Re)start one part on its own address; returns once it serves (a router: once it sees
        a healthy prefill and decode, so that the first request is not refused)."""
        proc = self.procs[name] = self._proc(name).start()
        proc.wait_ready(180)
        if name == "router" and not wait_until(self.router_ready, 60, interval=0.1):
            raise RuntimeError(f"router sees no healthy prefill and decode:\n{proc.tail()}")
        return proc

    def router_ready(self) -> bool:
        """Whether the router holds a healthy prefill and a healthy decode instance."""
        from pdmesh.common.v1 import common_pb2
        from pdmesh.router.v1 import router_pb2, router_pb2_grpc
        try:
            with grpc.insecure_channel(self.addr["router"]) as channel:
                listed = router_pb2_grpc.RouterServiceStub(channel).ListInstances(
                    router_pb2.ListInstancesRequest(), timeout=5)
        except grpc.RpcError:
            return False
        roles = {i.role for i in listed.instances if i.healthy}
        return {common_pb2.INSTANCE_ROLE_PREFILL, common_pb2.INSTANCE_ROLE_DECODE} <= roles

    def kill(self, name: str) -> float:
        """SIGKILL a whole part (its process group: an instance with its ranks); when."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        at = time.monotonic()
        proc.proc.wait()
        return at

    def rank_pid(self, name: str, dp_rank: int) -> int:
        return rank_pids(self.procs[name].pid)[dp_rank]

    def kill_rank(self, name: str, dp_rank: int) -> float:
        os.kill(self.rank_pid(name, dp_rank), signal.SIGKILL)
        return time.monotonic()

    def drop_links(self, name: str) -> float:
        """SIGUSR1 every rank of an instance: each closes all its UCX links."""
        for pid in rank_pids(self.procs[name].pid).values():
            os.kill(pid, signal.SIGUSR1)
        return time.monotonic()

    def settled(self, timeout: float = 60.0) -> bool:
        """Both instances: every rank alive and idle, every pool full."""
        return wait_until(lambda: settled(self.addr["prefill"], 2) and settled(self.addr["decode"], 2),
                          timeout, interval=0.25)

    def pids(self) -> dict[str, int]:
        """Every live process of the mesh, ranks included: name -> pid."""
        found = {}
        for name, proc in self.procs.items():
            if proc.alive():
                found[name] = proc.pid
                for rank, pid in rank_pids(proc.pid).items():
                    found[f"{name}[{rank}]"] = pid
        return found

    def client(self) -> RouterClient:
        return RouterClient(self.addr["router"])

    def stop(self) -> None:
        """Stop every part at once (SIGTERM; SIGKILL after 15 s), then anything left in their groups."""
        procs = [p for p in self.procs.values() if p.alive()]
        for proc in procs:
            proc.proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.stop()
        for proc in self.procs.values():
            if proc.proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # a rank that outlived its controller
                except ProcessLookupError:
                    pass
