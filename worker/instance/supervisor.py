"""Start, watch and restart one DP rank process.

A rank is a process of its own (it would own a GPU). The supervisor starts
`python -m pdmesh.worker.rank` with the rank's JSON config, reads the one readiness line the rank
prints on stdout (its gRPC port and UCX transfer address), and opens one channel to it. When the
process exits, the supervisor restarts it under the same rank number (dp_size never shrinks) and
calls `on_restart` so the controller can bump its epoch and re-register; calls that were in flight
on the dead rank fail UNAVAILABLE through gRPC by themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc

from pdmesh import grpcutil
from pdmesh.errors import Unavailable
from pdmesh.reasons import Reason
from pdmesh.worker.config import RankConfig

log = logging.getLogger(__name__)

READY_PREFIX = "PDMESH_RANK_READY "
START_TIMEOUT_S = 120.0
#: A rank's channel retries a failed connection within a second (grpc's backoff grows to 120 s).
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000))


@dataclass
class RankEndpoint:
    """Where a running rank answers: its gRPC port (loopback) and its UCX transfer address."""

    grpc_address: str
    transfer_address: str
    pid: int
    #: Loopback host:port of the rank's Prometheus endpoint ("" when the instance serves no metrics).
    metrics_address: str = ""


class RankSupervisor:
    """Owns one rank process for the life of the instance."""

    def __init__(self, config_for_start: Callable[[], RankConfig],
                 on_restart: Callable[[int], Awaitable[None]]) -> None:
        self._config_for_start = config_for_start
        self._on_restart = on_restart
        self.dp_rank = config_for_start().dp_rank
        self.endpoint: RankEndpoint | None = None
        self.channel: grpc.aio.Channel | None = None
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False
        self._ready = asyncio.Event()

    @property
    def alive(self) -> bool:
        return self._ready.is_set() and self._proc is not None and self._proc.returncode is None

    async def start(self) -> RankEndpoint:
        """Start the process and wait for its readiness line."""
        config = self._config_for_start()
        env = dict(os.environ)
        env.setdefault("PDMESH_TORCH_THREADS", "1")
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pdmesh.worker.rank", config.to_json(),
            stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 20)
        try:
            line = await asyncio.wait_for(self._read_ready(), START_TIMEOUT_S)
        except (asyncio.TimeoutError, EOFError) as exc:
            await self._kill()
            raise Unavailable(f"rank {self.dp_rank} did not start: {exc or 'no readiness line'}",
                              reason=Reason.RANK_START_FAILED, metadata={"dp_rank": self.dp_rank}) from None
        info = json.loads(line)
        self.endpoint = RankEndpoint(info["grpc_address"], info["transfer_address"], self._proc.pid,
                                     info.get("metrics_address", ""))
        if self.channel is not None:
            await self.channel.close()
        self.channel = grpcutil.open_channel(self.endpoint.grpc_address, tls=config.instance.tls,
                                             options=RECONNECT_OPTIONS)
        self._ready.set()
        self._watch = asyncio.create_task(self._watch_exit(self._proc))
        log.info("rank %d ready pid=%d grpc=%s transfer=%s", self.dp_rank, self._proc.pid,
                 self.endpoint.grpc_address, self.endpoint.transfer_address)
        return self.endpoint

    async def _read_ready(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        while True:
            raw = await self._proc.stdout.readline()
            if not raw:
                raise EOFError(f"rank {self.dp_rank} exited with code {await self._proc.wait()}")
            text = raw.decode(errors="replace").strip()
            if text.startswith(READY_PREFIX):
                asyncio.create_task(self._drain_stdout(self._proc))
                return text[len(READY_PREFIX):]
            log.info("rank %d: %s", self.dp_rank, text)

    async def _drain_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while await proc.stdout.readline():
            pass

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._stopping:
            return
        self._ready.clear()
        log.error("rank %d (pid %d) exited with code %s; restarting it", self.dp_rank, proc.pid, code)
        delay = 0.2
        while not self._stopping:
            try:
                await self.start()
                self.restarts += 1
                await self._on_restart(self.dp_rank)
                return
            except Exception as exc:  # noqa: BLE001 - keep trying with backoff
                log.error("rank %d restart failed: %s; retrying in %.1fs", self.dp_rank, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def wait_ready(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"DP rank {self.dp_rank} is restarting; retry shortly",
                              reason=Reason.RANK_UNAVAILABLE, metadata={"dp_rank": self.dp_rank}) from None

    async def _kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Terminate the rank (SIGTERM, then SIGKILL after `grace_s`)."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except asyncio.TimeoutError:
                await self._kill()
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
