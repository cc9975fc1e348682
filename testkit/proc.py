"""Real `pdmesh` processes for tests and benchmarks: start as the README does, wait for readiness, stop.

A `Proc` runs `python -m pdmesh.cli ...`, copies its output to a log file (printed when a test
fails to start it), and is ready when it prints its "<kind>: serving on HOST:PORT" line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LISTENING = re.compile(r": serving on (\S+)")
LOG_DIR = Path(tempfile.mkdtemp(prefix="pdmesh-test-logs-"))


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "pdmesh.cli", *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDMESH_TORCH_THREADS": "1", **(env or {})}
        self.log_path = LOG_DIR / f"{name}.log"
        self.address: str | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=self.env, text=True, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self.lines.append(line)
                match = LISTENING.search(line)
                if match and not self._ready.is_set():
                    self.address = match.group(1)
                    self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 120.0) -> str:
        if not self._ready.wait(timeout) or self.address is None:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")
        return self.address

    def tail(self, n: int = 30) -> str:
        return "".join(self.lines[-n:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (the instance and its rank processes)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def free_port() -> int:
    """A loopback port that is free now (the OS picks it)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """A base port with `n` consecutive free loopback ports (for `pdmesh up --base-port`), below
    the kernel's ephemeral range: a port from that range can be handed to any outgoing
    connection of another process between this check and the server's bind (seconds later,
    once `pdmesh up` has loaded its model), which made a test fail with "address already in use"
    beside a busy core."""
    import random
    import socket

    def free(port: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return True
            except OSError:
                return False
    low = _ephemeral_low()
    for _ in range(200):
        base = random.randrange(10000, low - n)
        if all(free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 where unreadable)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(10000 + 64, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


def stop_all(procs: list[Proc], timeout: float = 15.0) -> None:
    """SIGTERM every process at once, then wait for each (SIGKILL after `timeout`)."""
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        p.stop(timeout)


def start_all(procs: list[Proc], timeout: float = 180.0) -> list[Proc]:
    """Start every process at once, then wait for each; stop them all if one fails."""
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.wait_ready(timeout)
    except RuntimeError:
        stop_all(procs)
        raise
    return procs


#: Ports `pdmesh up` takes from its base: bootstrap, router, prefill, decode, the HTTP API.
UP_PORTS = 5


def start_up(name: str, *argv: str, log_dir, env: dict | None = None,
             timeout: float = 240.0) -> tuple[Proc, int]:
    """Run `pdmesh up ARGV` on free ports and wait until it serves; (the process, its base port).
    Stop it with `stop_up`."""
    base = free_port_range(UP_PORTS)
    up = Proc(name, ["up", "--base-port", str(base), "--log-dir", str(log_dir), *argv], env=env).start()
    deadline = time.monotonic() + timeout
    while not any("serving; router at" in line for line in up.lines):
        if not up.alive() or time.monotonic() > deadline:
            up.stop()
            raise RuntimeError(f"pdmesh up did not come up:\n{up.tail()}")
        time.sleep(0.1)
    return up, base


def stop_up(up: Proc, timeout: float = 60.0) -> None:
    """Ctrl-C, as a user would; it must stop every process it started and exit 0."""
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout) == 0, up.tail()
    assert "every process stopped" in "".join(up.lines), up.tail()
