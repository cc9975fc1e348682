"""Across hosts: the prefill and the decode in two network namespaces joined by a veth pair.

Namespace A (10.200.0.1) runs the bootstrap service and a prefill (dp 2) whose ranks publish
their UCX listeners at 10.200.0.1 (`--transfer-host`); namespace B (10.200.0.2) runs the decode
(dp 2), the router and the client. So the router's calls to the prefill, the decode's lookups at
the bootstrap service and every KV byte (UCX over tcp: `--ucx-tls tcp`) cross a real network
interface, and the test checks that they did (the veth's byte counters grow by at least the KV
moved; both sides share a kernel, so `--kv-transfer-path ucx` keeps the KV off the same-host
path). Only the two private addresses created here are ever used. Needs root and iproute2
(CI runs as root; `.ci/run` installs iproute2 where it is missing); skipped, saying why, where
namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from testkit.faultkit import wait_until
from testkit.proc import Proc
from pdmesh.router.up import colocated_text
from pdmesh.worker.engine.factory import EngineSpec, build_layout

ADDR_A, ADDR_B = "10.200.0.1", "10.200.0.2"
PROMPTS = [f"across hosts, request {i}: " + "the KV crosses a veth pair " * 3 for i in range(3)]
MAX_NEW = 6

CLIENT = """
import asyncio, json, sys
from pdmesh.router.client import RouterClient
async def main():
    async with RouterClient(sys.argv[1]) as client:
        out = []
        for prompt in json.loads(sys.argv[2]):
            s = await client.generate(prompt, max_new_tokens=int(sys.argv[3]), timeout=60)
            out.append({"text": s.text, "path": s.rank_path, "prefill_rank": s.info.routing.prefill_dp_rank})
        print(json.dumps(out))
asyncio.run(main())
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=check)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


@pytest.fixture(scope="module")
def namespaces():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed: no network namespaces here")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, veth_a, veth_b = f"pdm-a-{tag}", f"pdm-b-{tag}", f"pdva{tag}", f"pdvb{tag}"
    made = sh("ip", "netns", "add", ns_a, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        sh("ip", "netns", "add", ns_b)
        sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        sh("ip", "link", "set", veth_a, "netns", ns_a)
        sh("ip", "link", "set", veth_b, "netns", ns_b)
        for ns, veth, addr in ((ns_a, veth_a, ADDR_A), (ns_b, veth_b, ADDR_B)):
            sh(*in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", veth))
            sh(*in_ns(ns, "ip", "link", "set", veth, "up"))
            sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
        yield {"a": ns_a, "b": ns_b, "veth_b": veth_b}
    finally:
        for ns in (ns_a, ns_b):
            sh("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair with it


def ns_proc(ns: str, name: str, args: list[str]) -> Proc:
    proc = Proc(name, args)
    proc.argv = in_ns(ns, *proc.argv)  # `ip netns exec` execs the command: same pid, same group
    return proc


def rx_bytes(ns: str, veth: str) -> int:
    return int(sh(*in_ns(ns, "cat", f"/sys/class/net/{veth}/statistics/rx_bytes")).stdout)


def test_prefill_and_decode_in_two_namespaces_over_a_veth_pair(namespaces):
    ns_a, ns_b = namespaces["a"], namespaces["b"]
    procs: list[Proc] = []
    try:
        boot = ns_proc(ns_a, "netns-bootstrap", ["bootstrap", "--host", ADDR_A, "--port", "0"]).start()
        procs.append(boot)
        boot_addr = boot.wait_ready()
        prefill = ns_proc(ns_a, "netns-prefill", [
            "prefill", "--host", ADDR_A, "--port", "0", "--instance-id", "netns-p", "--dp-size", "2",
            "--load-balance-method", "round_robin", "--bootstrap-addr", boot_addr,
            "--transfer-host", ADDR_A, "--ucx-tls", "tcp", "--kv-transfer-path", "ucx"]).start()
        decode = ns_proc(ns_b, "netns-decode", ["decode", "--host", ADDR_B, "--port", "0", "--instance-id",
                                                 "netns-d", "--dp-size", "2", "--ucx-tls", "tcp",
                                                 "--kv-transfer-path", "ucx"]).start()
        procs += [prefill, decode]
        prefill_addr, decode_addr = prefill.wait_ready(180), decode.wait_ready(180)
        assert prefill_addr.startswith(ADDR_A + ":") and decode_addr.startswith(ADDR_B + ":")
        router = ns_proc(ns_b, "netns-router", ["router", "--host", ADDR_B, "--port", "0",
                                                 "--prefill", prefill_addr, "--decode", decode_addr]).start()
        procs.append(router)
        router_addr = router.wait_ready()

        before = rx_bytes(ns_b, namespaces["veth_b"])
        client = subprocess.run(in_ns(ns_b, sys.executable, "-c", CLIENT, router_addr, json.dumps(PROMPTS),
                                      str(MAX_NEW)), capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr[-3000:] + prefill.tail() + decode.tail()
        received = rx_bytes(ns_b, namespaces["veth_b"]) - before
        samples = json.loads(client.stdout)
        for prompt, sample in zip(PROMPTS, samples):
            assert sample["text"] == colocated_text(prompt, MAX_NEW, model=None, preset="tiny")
        assert {s["path"] for s in samples} == {"lookup"}  # the decode looked rooms up across too
        layout = build_layout(EngineSpec())
        kv_bytes = sum(layout.request_bytes(layout.pages_for_tokens(len(p.encode()))) for p in PROMPTS)
        assert received > kv_bytes, (received, kv_bytes)  # every KV byte came in over the veth
        # the prefill really published its namespace address, not loopback
        assert any(f"transfer=ucx://{ADDR_A}:" in line for line in prefill.lines), prefill.tail()
    finally:
        for proc in procs:
            if proc.alive():
                proc.proc.terminate()
        for proc in procs:
            proc.stop()
        assert wait_until(lambda: not any(p.alive() for p in procs), 5)
