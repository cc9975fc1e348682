"""A worker instance process (`pdmesh prefill` / `pdmesh decode`): the controller endpoint.

Owns the instance's life: an embedded bootstrap service when asked (`--bootstrap-port`), the
DP controller and its rank processes, the gRPC server (role service + InstanceService + health +
reflection), and for a prefill the registration of its instance info at the bootstrap service,
kept alive by heartbeats, re-registered when the bootstrap service restarts and re-published
with a new epoch when a rank restarts (its transfer address changed). Drain stops new requests,
waits for those in flight, deregisters and exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from pdmesh import grpcutil, metrics
from pdmesh.bootstrap.v1 import bootstrap_pb2
from pdmesh.config import INSTANCE_ROLES, LOAD_BALANCE_METHODS
from pdmesh.errors import PdmeshError
from pdmesh.worker.config import PREFILL, InstanceConfig
from pdmesh.worker.instance.controller import Controller
from pdmesh.worker.instance.controller_service import (DecodeControllerService, InstanceControllerService,
                                              PrefillControllerService)
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class Instance:
    def __init__(self, config: InstanceConfig) -> None:
        self.config = config
        self.embedded = None
        self.bootstrap_address = config.bootstrap_address
        self.controller: Controller | None = None
        self.server = None
        self.port = 0
        self._registration: asyncio.Task | None = None
        self.stopped = asyncio.Event()
        self._drain_task: asyncio.Task | None = None

    async def start(self) -> "Instance":
        cfg = self.config
        if cfg.role == PREFILL and cfg.bootstrap_port is not None:
            from pdmesh.server.config import BootstrapConfig
            from pdmesh.server.service import create_bootstrap_server
            self.embedded = create_bootstrap_server(
                f"{cfg.host}:{cfg.bootstrap_port}",
                BootstrapConfig(host=cfg.host, port=cfg.bootstrap_port, tls=cfg.tls)).service
            await self.embedded.start()
            self.bootstrap_address = self.embedded.address
        self.controller = Controller(cfg, self.bootstrap_address, on_epoch_change=self._republish)
        await self.controller.start()
        metrics.track(self.controller, Controller.gauge_samples)  # in flight, up and restarts per rank
        role_service = (PrefillControllerService(self.controller) if cfg.role == PREFILL
                        else DecodeControllerService(self.controller))
        add_role = (worker_pb2_grpc.add_PrefillServiceServicer_to_server if cfg.role == PREFILL
                    else worker_pb2_grpc.add_DecodeServiceServicer_to_server)
        instance_service = StatusAwareInstanceService(self.controller, self._drained, self)
        names = [worker_pb2.DESCRIPTOR.services_by_name["PrefillService" if cfg.role == PREFILL
                                                        else "DecodeService"].full_name,
                 worker_pb2.DESCRIPTOR.services_by_name["InstanceService"].full_name]
        self.server, self.port, health = grpcutil.create_server(
            f"{cfg.host}:{cfg.port}",
            [lambda s: add_role(role_service, s),
             lambda s: worker_pb2_grpc.add_InstanceServiceServicer_to_server(instance_service, s)], names,
            tls=cfg.tls)
        await self.server.start()
        if cfg.role == PREFILL:
            await self._republish()
        await grpcutil.set_serving(health, names)
        return self

    # --- registration (prefill) -------------------------------------------------------------

    def instance_info(self) -> bootstrap_pb2.InstanceInfo:
        cfg, ctl = self.config, self.controller
        endpoints = [bootstrap_pb2.RankEndpoint(dp_rank=r.dp_rank, transfer_address=r.endpoint.transfer_address,
                                                control_address=r.endpoint.grpc_address)
                     for r in ctl.ranks if r.endpoint is not None]
        layout = self._layout()
        return bootstrap_pb2.InstanceInfo(
            instance_id=cfg.instance_id, epoch=ctl.epoch, dp_size=cfg.dp_size, tp_size=1, pp_size=1,
            kv_layout=layout, load_balance_method=LOAD_BALANCE_METHODS[cfg.load_balance_method],
            force_query_prefill_dp_rank=cfg.force_query_prefill_dp_rank, rank_endpoints=endpoints,
            control_address=f"{cfg.host}:{self.port}")

    def _layout(self):
        from pdmesh.worker.engine.factory import build_layout
        return build_layout(self.config.engine).to_proto()

    async def _republish(self) -> None:
        if self.config.role != PREFILL or self.controller is None:
            return
        from pdmesh.server.client import shared_client
        if self._registration is not None:
            self._registration.cancel()
        client = shared_client(self.bootstrap_address, self.config.tls)
        info = self.instance_info()
        await client.register_instance(info)
        self._registration = asyncio.create_task(self._keep(client, info))

    async def _keep(self, client, info) -> None:
        try:
            await client.keep_registered(info)
        except PdmeshError as exc:
            log.error("instance %s lost its registration: %s", self.config.instance_id, exc)

    # --- stop and drain -----------------------------------------------------------------------

    def _drained(self, drain_coro) -> None:
        async def run() -> None:
            await drain_coro
            log.info("instance %s drained; deregistering and exiting", self.config.instance_id)
            self.stopped.set()
        self._drain_task = asyncio.create_task(run())

    async def stop(self) -> None:
        if self._registration is not None:
            self._registration.cancel()
        if self.config.role == PREFILL and self.bootstrap_address:
            from pdmesh.server.client import close_shared_clients, shared_client
            try:
                await shared_client(self.bootstrap_address, self.config.tls).deregister_instance(
                    self.config.instance_id, self.controller.epoch if self.controller else 0, timeout=1.0)
            except PdmeshError as exc:
                log.info("deregister: %s", exc)
            await close_shared_clients()
        if self.server is not None:
            await self.server.stop(2.0)
        if self.controller is not None:
            await self.controller.stop()
        if self.embedded is not None:
            await self.embedded.stop()


class StatusAwareInstanceService(InstanceControllerService):
    """The controller's InstanceService, with the instance-level fields filled in."""

    def __init__(self, controller: Controller, on_drained, instance: Instance) -> None:
        super().__init__(controller, on_drained)
        self.instance = instance

    async def GetInstanceStatus(self, request, context):
        status = await super().GetInstanceStatus(request, context)
        cfg = self.instance.config
        status.bootstrap_address = self.instance.bootstrap_address or ""
        status.dp_size = cfg.dp_size
        status.role = INSTANCE_ROLES[cfg.role]
        status.load_balance_method = LOAD_BALANCE_METHODS[cfg.load_balance_method]
        return status


async def serve(config: InstanceConfig) -> int:
    instance = Instance(config)
    try:
        await instance.start()
    except BaseException:
        await instance.stop()
        raise
    from pdmesh.tls import warn_if_exposed
    warn_if_exposed(f"pdmesh {config.role}", config.host, config.tls)
    endpoint = metrics.start(config.role, config.metrics_port, config.metrics_host or config.host,
                             tls=config.tls, registry=metrics.controller_fan_in(instance.controller))
    print(f"pdmesh {config.role} {config.instance_id}: serving on {config.host}:{instance.port}"
          + (f" (bootstrap {instance.bootstrap_address})" if instance.bootstrap_address else ""), flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, instance.stopped.set)
    await instance.stopped.wait()
    await instance.stop()
    if endpoint is not None:
        endpoint.close()
    return 0
