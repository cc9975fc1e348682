"""Pre-linking: a decode that knows the bootstrap links to every prefill rank before requests do.

Real processes on loopback: a bootstrap service, a prefill (dp 2) started before the decode and
one started after it; the decode (`--bootstrap-addr`) must link to each of their ranks (its log
says so, same host) with no request sent, and requests to both prefills must then be served.
A prefill instance with another KV layout is not linked.
"""

from __future__ import annotations

import asyncio
import secrets

import grpc
import pytest

from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from pdmesh.common.v1 import common_pb2
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc
from procs import Proc, start_all, stop_all
from testkit.faultkit import wait_until

WAIT_S = 120.0  # generous: the decode looks every 2 s; a loaded 2-core machine is slow


def _rank_addresses(boot_addr: str, instance_id: str) -> list[str]:
    with grpc.insecure_channel(boot_addr) as ch:
        stub = bootstrap_pb2_grpc.BootstrapServiceStub(ch)
        reply = stub.GetInstance(bootstrap_pb2.GetInstanceRequest(instance_id=instance_id), timeout=30)
    return [e.transfer_address for e in reply.info.rank_endpoints]


def _wait_for_lines(proc: Proc, needles: list[str], timeout: float = WAIT_S) -> None:
    """Until the decode's own log says it linked (the log lines are what pre-linking owns)."""
    if not wait_until(lambda: all(n in "".join(proc.lines) for n in needles), timeout):
        pytest.fail(f"{proc.name} never logged {needles}:\n{proc.tail(40)}")


def _pre_linked(address: str) -> str:
    return f"pre-linked prefill rank {address} (same host"


def _pair(prefill: Proc, decode: Proc, boot_addr: str, instance_id: str) -> list[int]:
    room, token = secrets.randbits(63) or 1, secrets.token_bytes(16)
    sampling = common_pb2.SamplingParams(max_new_tokens=3, ignore_eos=True)
    prompt = worker_pb2.Prompt(text="pre-linked links carry the first request")
    with grpc.insecure_channel(prefill.address) as pch, grpc.insecure_channel(decode.address) as dch:
        p_call = worker_pb2_grpc.PrefillServiceStub(pch).Prefill.future(worker_pb2.PrefillRequest(
            bootstrap_room=room, prompt=prompt, sampling=sampling, transfer_token=token), timeout=120)
        tokens = [t for m in worker_pb2_grpc.DecodeServiceStub(dch).Decode(worker_pb2.DecodeRequest(
            bootstrap_room=room, prompt=prompt, sampling=sampling, prefill_instance_id=instance_id,
            prefill_bootstrap_address=boot_addr, transfer_token=token), timeout=120)
            for t in m.token_ids]
        p_call.result()
    return tokens


def test_decode_links_to_prefill_ranks_before_any_request():
    boot = Proc("prelink-bootstrap", ["bootstrap", "--port", "0"]).start()
    boot_addr = boot.wait_ready()
    common = ["--num-pages", "64", "--bootstrap-addr", boot_addr]
    procs = [boot]
    try:
        early, other = start_all([
            Proc("prelink-p-early", ["prefill", "--instance-id", "p-early", "--dp-size", "2", *common]),
            # another model: another KV layout, so nothing to link to
            Proc("prelink-p-other", ["prefill", "--instance-id", "p-other", "--model-preset",
                                     "bench-kv", "--dp-size", "1", *common])])
        procs += [early, other]
        decode = start_all([Proc("prelink-decode", ["decode", "--instance-id", "d-prelink",
                                                    *common])])[0]
        procs.append(decode)
        _wait_for_lines(decode, [_pre_linked(a) for a in _rank_addresses(boot_addr, "p-early")])

        late = start_all([Proc("prelink-p-late", ["prefill", "--instance-id", "p-late", *common])])[0]
        procs.append(late)
        _wait_for_lines(decode, [_pre_linked(a) for a in _rank_addresses(boot_addr, "p-late")])

        assert len(_pair(early, decode, boot_addr, "p-early")) == 3
        assert len(_pair(late, decode, boot_addr, "p-late")) == 3
        other_rank = _rank_addresses(boot_addr, "p-other")[0]
        assert f"prefill rank {other_rank}" not in "".join(decode.lines), decode.tail(40)
    finally:
        stop_all(procs)


def test_listed_info_never_replaces_a_newer_epoch():
    """The list a decode pre-links from may be older than the info a request just refreshed."""
    from pdmesh.worker.rank.decode_rank import InstanceInfoCache

    cache = InstanceInfoCache()
    old, new = (bootstrap_pb2.InstanceInfo(instance_id="p", epoch=e, dp_size=1) for e in (1, 2))
    cached = lambda: asyncio.run(cache.get("boot:1", "p"))  # noqa: E731 - cached: no call made
    cache.put("boot:1", new)
    cache.put("boot:1", old)
    assert cached().epoch == 2
    cache.put("boot:1", bootstrap_pb2.InstanceInfo(instance_id="p", epoch=3, dp_size=2))
    assert cached().dp_size == 2
