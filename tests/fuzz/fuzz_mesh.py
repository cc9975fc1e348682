"""The mesh the fuzz tests hit: `pdmesh up` (bootstrap, router, prefill dp 2, decode dp 2), raw
callers for each service, the batch runner that checks every call, and the health check after.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from typing import Callable

from grpc_health.v1 import health_pb2

from pdmesh.bootstrap.v1 import bootstrap_pb2 as bpb
from pdmesh.router.v1 import router_pb2 as rpb
from pdmesh.worker.v1 import worker_pb2 as wpb
from fuzz_oracle import Expect, check, expect_parsed
from fuzz_wire import Caller, LoopThread, Outcome
from procs import start_up

BOOTSTRAP = "/pdmesh.bootstrap.v1.BootstrapService/"
PREFILL = "/pdmesh.worker.v1.PrefillService/"
DECODE = "/pdmesh.worker.v1.DecodeService/"
INSTANCE = "/pdmesh.worker.v1.InstanceService/"
ROUTER = "/pdmesh.router.v1.RouterService/"
HEALTH = "/grpc.health.v1.Health/Check"
PREFILL_ID = "prefill-0"
STREAMING = {DECODE + "Decode", ROUTER + "Generate"}
CHILD_PID = re.compile(r"\(pid (\d+),")  # `pdmesh up` prints each child's pid


class Mesh:
    """A running `pdmesh up` and one raw caller per service, on `loop`."""

    def __init__(self, loop: LoopThread, log_dir: str) -> None:
        self.loop = loop
        attach = os.environ.get("PDMESH_FUZZ_BASE_PORT")  # a `pdmesh up` already running there
        self.up, self.log_dir = None, None if attach else log_dir
        if attach:
            base = int(attach)
        else:
            self.up, base = start_up("fuzz-up", "--model-preset", "tiny", log_dir=log_dir, timeout=300)
        self.address = {name: f"127.0.0.1:{base + i}"
                        for i, name in enumerate(["bootstrap", "router", "prefill", "decode"])}
        self.callers = self.run(self._callers())
        info = self.run(self.callers["bootstrap"].unary(
            BOOTSTRAP + "GetInstance", bpb.GetInstanceRequest(instance_id=PREFILL_ID).SerializeToString(), 10))
        self.prefill_info = bpb.GetInstanceResponse.FromString(info.responses[0]).info

    async def _callers(self) -> dict[str, Caller]:
        return {name: Caller(address) for name, address in self.address.items()}

    def run(self, coro, timeout: float = 300.0):
        return self.loop.run(coro, timeout)

    def alive(self) -> bool:
        return self.up is None or self.up.alive()

    def stop(self) -> int | None:
        """Ctrl-C to `pdmesh up` (it stops its children, also mid-start); then make sure."""
        if getattr(self, "callers", None):
            async def close() -> None:
                await asyncio.gather(*(c.close() for c in self.callers.values()))
            self.run(close())
        if self.up is None:
            return 0
        self.up.proc.send_signal(signal.SIGINT)
        try:
            code = self.up.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.up.proc.kill()
            code = self.up.proc.wait()
        for pid in {int(m) for m in CHILD_PID.findall("".join(self.up.lines))}:
            _terminate(pid)  # a child `up` did not get to stop (it runs in its own session)
        return code

    async def invoke(self, service: str, method: str, data, timeout: float) -> Outcome:
        caller = self.callers[service]
        if isinstance(data, list):
            return await caller.bidi(method, data, timeout)
        if method in STREAMING:
            return await caller.server_stream(method, data, timeout)
        return await caller.unary(method, data, timeout)

    def fuzz(self, rpc: str, service: str, method: str, request_type, model, batch: list[bytes], *,
             wait_s: float = 0.6, timeout_s: float = 20.0, skip: Callable[[object], bool] | None = None,
             after: Callable[[bytes, Outcome], object] | None = None, expect: Expect | None = None) -> None:
        """Send `batch` at once to `service`; check each outcome against `model` (or `expect`, for
        streams of messages); run `after` on each (cleanup). Inputs `skip` refuses (they would harm
        the mesh itself) are not sent."""
        async def one() -> None:
            cases = []
            for data in batch:
                parsed = _parse(request_type, data)
                if skip is not None and parsed is not None and skip(parsed):
                    continue
                want = expect or expect_parsed(request_type, data, model)
                cases.append((data, want, wait_s if want.may_wait else timeout_s))
            outs = await asyncio.gather(*(self.invoke(service, method, d, t) for d, _, t in cases))
            for (data, want, timeout), out in zip(cases, outs):
                parsed = _parse(request_type, data)
                check(rpc, want, out, timeout, data if parsed is None else parsed)
                if after is not None:
                    await after(data, out)
        self.run(one())

    # --- after the fuzz -------------------------------------------------------------------------

    def serving(self, service: str) -> bool:
        out = self.run(self.callers[service].unary(HEALTH, health_pb2.HealthCheckRequest().SerializeToString(), 10))
        return out.ok and health_pb2.HealthCheckResponse.FromString(out.responses[0]).status == \
            health_pb2.HealthCheckResponse.SERVING

    def status(self, service: str) -> wpb.GetInstanceStatusResponse:
        out = self.run(self.callers[service].unary(INSTANCE + "GetInstanceStatus", b"", 10))
        assert out.ok, out
        return wpb.GetInstanceStatusResponse.FromString(out.responses[0])

    def registered_ids(self) -> list[str]:
        out = self.run(self.callers["bootstrap"].unary(BOOTSTRAP + "ListInstances", b"", 10))
        return [i.instance_id for i in bpb.ListInstancesResponse.FromString(out.responses[0]).instances]

    def log_problems(self) -> list[str]:
        """Lines of the mesh's logs that tell of an unexpected exception (none is expected)."""
        if self.log_dir is None:
            return []
        lines = []
        for path in sorted(os.listdir(self.log_dir)):
            with open(os.path.join(self.log_dir, path), errors="replace") as log:
                lines += [f"{path}: {line.rstrip()}" for line in log if "Traceback" in line or " ERROR " in line]
        return lines

    def router_instances(self) -> list[rpb.Instance]:
        out = self.run(self.callers["router"].unary(ROUTER + "ListInstances", b"", 10))
        return list(rpb.ListInstancesResponse.FromString(out.responses[0]).instances)


def _terminate(pid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _parse(request_type, data):
    if isinstance(data, list):
        return None
    try:
        return request_type.FromString(data)
    except Exception:  # noqa: BLE001 - undecodable: sent as it is
        return None


def expect_all(expect: Expect) -> Callable[[object], Expect]:
    return lambda _message: expect
