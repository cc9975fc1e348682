"""One `pdmesh up` for every end-to-end test of the router package (gRPC and HTTP API alike).

bootstrap, router (its HTTP API on base + 4), a follow_bootstrap_room prefill (dp 2) and a decode
(dp 2), each a separate process, the exact `tiny` engine. Tests that disturb a mesh leave it as
they found it (they wait until the pools are full again).
"""

from __future__ import annotations

import pytest

from procs import start_up, stop_up


@pytest.fixture(scope="package")
def mesh(tmp_path_factory):
    up, base = start_up("up", "--model-preset", "tiny", log_dir=tmp_path_factory.mktemp("up-logs"))
    yield {"up": up, "router": f"127.0.0.1:{base + 1}", "prefill": f"127.0.0.1:{base + 2}",
           "decode": f"127.0.0.1:{base + 3}", "bootstrap": f"127.0.0.1:{base}",
           "url": f"http://127.0.0.1:{base + 4}/v1"}
    stop_up(up)
