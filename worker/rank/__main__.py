"""The DP rank process: `python -m pdmesh.worker.rank '<RankConfig JSON>'` (started by its controller).

Builds the rank's engine, KV pool, UCX data-plane endpoint and gRPC server (127.0.0.1, a free
port), warms them up (`warmup.py`: engine, kernels, staging buffers, a loopback transfer), then
prints one readiness line `PDMESH_RANK_READY {"grpc_address", "transfer_address"}` on
stdout for the controller and serves until SIGTERM. A prefill rank serves `PrefillService`, a
decode rank `DecodeService` (with its continuous-batching loop); both serve `InstanceService`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from pdmesh import grpcutil, logs, metrics
from pdmesh.worker.config import DECODE, PREFILL, RankConfig
from pdmesh.worker.instance.supervisor import READY_PREFIX
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


def _device(config: RankConfig) -> str:
    devices = config.instance.devices
    if devices:
        return devices[config.dp_rank % len(devices)]
    return config.instance.engine.device


async def serve(config: RankConfig) -> None:
    import dataclasses

    from pdmesh.server.client import close_shared_clients, shared_client
    from pdmesh.worker.rank.decode_loop import DecodeLoop
    from pdmesh.worker.engine.factory import build_engine
    from pdmesh.worker.kv.pool import KvPool
    from pdmesh.worker.rank.kv_link import RankTransfer
    from pdmesh.worker.rank.pages import PageBroker
    from pdmesh.worker.rank.rank_state import RankInstanceService, RankState

    inst = config.instance
    spec = dataclasses.replace(inst.engine, device=_device(config))
    engine = build_engine(spec)
    # a decode's CPU pool lives in shared memory: prefill ranks of this host write into it
    shared = inst.role == DECODE and inst.kv_transfer_path == "auto"
    pages = PageBroker(KvPool(engine.layout, inst.num_pages, device=spec.device, shared=shared))
    transfer = RankTransfer(config, pages)
    transfer_address = await transfer.start()
    bootstrap = shared_client(config.bootstrap_address, inst.tls) if config.bootstrap_address else None
    if bootstrap is not None:  # connect now, not under the first burst of registrations
        await asyncio.wait([asyncio.ensure_future(bootstrap.channel.channel_ready())], timeout=5.0)
    state = RankState(config, engine, pages, transfer, bootstrap)
    from pdmesh.worker.rank import debug_faults, warmup
    if warmup.enabled():  # before the rank reports ready: the first request pays no set-up
        await warmup.warm_rank(engine, pages, transfer, state.engine_thread)
    debug_faults.install(transfer, asyncio.get_running_loop())
    register = [lambda s: worker_pb2_grpc.add_InstanceServiceServicer_to_server(
        RankInstanceService(state, transfer.abort), s)]
    names = [worker_pb2.DESCRIPTOR.services_by_name["InstanceService"].full_name]
    loop_ = None
    if inst.role == PREFILL:
        from pdmesh.worker.rank.prefill_rank import PrefillRankService
        service = PrefillRankService(state)
        register.append(lambda s: worker_pb2_grpc.add_PrefillServiceServicer_to_server(service, s))
        names.append(worker_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name)
    else:
        from pdmesh.worker.rank.decode_rank import DecodeRankService
        loop_ = DecodeLoop(engine, pages, state.engine_thread, inst.max_running_requests)
        loop_.start()
        service = DecodeRankService(state, loop_)
        await service.prelinker.start()  # with a bootstrap: links to its prefills before ready
        register.append(lambda s: worker_pb2_grpc.add_DecodeServiceServicer_to_server(service, s))
        names.append(worker_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name)
    server, port, health = grpcutil.create_server("127.0.0.1:0", register, names, tls=inst.tls)
    await server.start()
    await grpcutil.set_serving(health, names)
    metrics.prepare_rank(inst.role)
    metrics.track(state, RankState.gauge_samples)  # pool pages and active rooms
    if loop_ is not None:
        metrics.track(loop_, DecodeLoop.gauge_samples)
    # Loopback only: the controller reads it and serves it, labelled dp_rank, on its own /metrics.
    endpoint = metrics.serve("127.0.0.1", 0) if inst.metrics_port is not None else None
    print(READY_PREFIX + json.dumps({"grpc_address": f"127.0.0.1:{port}",
                                     "transfer_address": transfer_address,
                                     "metrics_address": endpoint.address if endpoint else ""}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2.0)
    if loop_ is not None:
        await service.prelinker.close()
        await loop_.stop()
    await transfer.close()
    await close_shared_clients()
    state.engine_thread.shutdown()


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the controller dies, so no rank outlives its instance."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = RankConfig.from_json(argv[0])
    _die_with_parent()
    logs.configure(f"{config.instance.role}[{config.dp_rank}]")  # PDMESH_LOG_LEVEL, PDMESH_LOG_FORMAT
    from pdmesh.worker.engine.runtime import configure_torch_threads
    configure_torch_threads()
    os.environ.setdefault("PDMESH_RANK", str(config.dp_rank))
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
