"""`pdmesh bootstrap --demo`: register a demo prefill instance and rooms, look them up, print it.

What a prefill and a decode do with the service, in a few lines, against the running service.
The demo instance stays registered so grpcurl can look at it (README, "grpcurl").
"""

from __future__ import annotations

import asyncio
import random
import time

from pdmesh.bootstrap.v1 import bootstrap_pb2
from pdmesh.common.v1 import common_pb2
from pdmesh.errors import PdmeshError
from pdmesh.server.client import BootstrapClient

DEMO_INSTANCE = "demo-prefill"


def instance_info(instance_id: str = DEMO_INSTANCE, *, epoch: int | None = None, dp_size: int = 2,
                  method: int = common_pb2.LOAD_BALANCE_METHOD_ROUND_ROBIN, force_query: bool = False,
                  base_port: int = 47000, **fields) -> bootstrap_pb2.InstanceInfo:
    """A valid InstanceInfo (a small bf16 layout, ranks on 127.0.0.1:base_port+rank) for
    demos and tests; `fields` override any other InstanceInfo field."""
    info = bootstrap_pb2.InstanceInfo(
        instance_id=instance_id, epoch=time.time_ns() if epoch is None else epoch, dp_size=dp_size,
        tp_size=1, pp_size=1,
        kv_layout=common_pb2.KvLayout(num_layers=2, page_size=16, num_kv_heads=2, head_dim=64,
                                      dtype=common_pb2.KV_DTYPE_BF16),
        load_balance_method=method, force_query_prefill_dp_rank=force_query,
        rank_endpoints=[bootstrap_pb2.RankEndpoint(dp_rank=r, transfer_address=f"127.0.0.1:{base_port + r}",
                                                   control_address=f"127.0.0.1:{base_port + 1000 + r}")
                        for r in range(dp_size)])
    for name, value in fields.items():
        setattr(info, name, value)
    return info


async def run_demo(address: str, out=print, tls=None) -> None:
    """Drive the service at `address` as a prefill and a decode would; report each step."""
    async with BootstrapClient(address, tls=tls) as client:
        info = instance_info()
        await client.register_instance(info)
        out(f"demo: registered instance {info.instance_id} (epoch {info.epoch}, dp_size {info.dp_size}, "
            "round_robin)")
        room = random.randrange(1, 1 << 63)
        await client.register_room(DEMO_INSTANCE, room, dp_rank=1, request_id="demo-request-1")
        out(f"demo: prefill rank 1 registered room {room}")
        t0 = time.perf_counter()
        found = await client.lookup_room(room)
        out(f"demo: LookupRoom({room}) -> rank {found.dp_rank} of {found.instance_id} "
            f"in {(time.perf_counter() - t0) * 1e3:.2f} ms")
        late = random.randrange(1, 1 << 63)
        waiting = asyncio.ensure_future(client.wait_for_room(late, timeout=5.0))
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        await client.register_room(DEMO_INSTANCE, late, dp_rank=0, request_id="demo-request-2")
        rank = await waiting
        out(f"demo: a decode waited for room {late}; 0.2 s later prefill rank 0 registered it, and "
            f"{(time.perf_counter() - t0) * 1e3:.2f} ms after the registration call began the waiter "
            f"had rank {rank}")
        try:
            await client.register_room(DEMO_INSTANCE, room, dp_rank=0, request_id="demo-request-3")
        except PdmeshError as exc:
            out(f"demo: registering room {room} again with rank 0 -> {exc}")
        try:
            await client.lookup_room(1 << 63)
        except PdmeshError as exc:
            out(f"demo: looking up room 2^63 -> {exc}")
        out(f"demo: done; serving on {address} until Ctrl-C "
            f"(try: grpcurl {_grpcurl_flags(tls)} {address} list)")


def _grpcurl_flags(tls) -> str:
    """grpcurl's flags for the service's TLS settings (a client certificate under mTLS)."""
    if tls is None:
        return "-plaintext"
    flags = [f"-cacert {tls.ca_file}"] if tls.ca_file else []
    if tls.require_client_cert:
        flags.append("-cert <client.pem> -key <client.key>")
    return " ".join(flags) or "-cacert <ca.pem>"
