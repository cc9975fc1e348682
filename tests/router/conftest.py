"""One `pdmesh up` for every end-to-end test of the router package (gRPC and HTTP API alike).

bootstrap, router (its HTTP API on base + 4), a follow_bootstrap_room prefill (dp 2) and a decode
(dp 2), each a separate process, the exact `tiny` engine. Tests that disturb a mesh leave it as
they found it (they wait until the pools are full again).
"""

from __future__ import annotations

import signal
import time

import pytest

from procs import Proc, free_port_range


@pytest.fixture(scope="package")
def mesh(tmp_path_factory):
    base = free_port_range(5)  # pdmesh up: 4 services and the HTTP API
    up = Proc("up", ["up", "--model-preset", "tiny", "--base-port", str(base), "--log-dir", str(tmp_path_factory.mktemp("up-logs"))])
    up.start()
    deadline = time.monotonic() + 180
    while not any("serving; router at" in line for line in up.lines):
        if not up.alive() or time.monotonic() > deadline:
            up.stop()
            raise RuntimeError(f"pdmesh up did not come up:\n{up.tail()}")
        time.sleep(0.1)
    yield {"up": up, "router": f"127.0.0.1:{base + 1}", "prefill": f"127.0.0.1:{base + 2}",
           "decode": f"127.0.0.1:{base + 3}", "bootstrap": f"127.0.0.1:{base}",
           "url": f"http://127.0.0.1:{base + 4}/v1"}
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(30) == 0, up.tail()
    assert "every process stopped" in "".join(up.lines)
