"""Flags of `pdmesh prefill` and `pdmesh decode` (each with a `PDMESH_*` variable) -> InstanceConfig."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

from pdmesh import metrics, tls
from pdmesh.config import env, env_flag
from pdmesh.worker.config import PREFILL, InstanceConfig
from pdmesh.worker.engine.factory import add_engine_arguments, spec_from_args


def configure_parser(p: argparse.ArgumentParser, role: str) -> None:
    prefix = role.upper()
    p.add_argument("--host", default=env(f"{prefix}_HOST", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env(f"{prefix}_PORT", "0")), help="gRPC port (0 = a free one)")
    p.add_argument("--instance-id", default=env(f"{prefix}_INSTANCE_ID"),
                   help=f"unique id (default {role}-<hostname>-<pid>)")
    p.add_argument("--dp-size", type=int, default=int(env("DP_SIZE", "1")), help="DP rank processes")
    methods = ["round_robin", "shortest_queue"] + (["follow_bootstrap_room"] if role == PREFILL else [])
    p.add_argument("--load-balance-method", choices=methods,
                   default=env(f"{prefix}_LOAD_BALANCE_METHOD", "round_robin"),
                   help="how the controller picks a rank when the request pins none")
    p.add_argument("--num-pages", type=int, default=int(env("NUM_PAGES", "1024")), help="KV pages per rank")
    p.add_argument("--max-running-requests", type=int, default=int(env("MAX_RUNNING_REQUESTS", "64")))
    p.add_argument("--page-wait-s", type=float, default=float(env("PAGE_WAIT_S", "5")),
                   help="how long a request waits for free KV pages before RESOURCE_EXHAUSTED")
    p.add_argument("--ucx-tls", default=env("UCX_TLS_OVERRIDE"),
                   help="UCX transports for KV, e.g. tcp or sm,self,tcp (default: pdmesh's choice)")
    p.add_argument("--kv-min-chunks", type=int, default=int(env("KV_MIN_CHUNKS", "8")),
                   help="decode: cut each KV transfer into at least this many chunks of layers, so "
                        "a streamed prefill's first layers leave early (default 8) [PDMESH_KV_MIN_CHUNKS]")
    p.add_argument("--kv-transfer-path", choices=("auto", "ucx"), default=env("KV_TRANSFER_PATH", "auto"),
                   help="auto: KV between ranks of one host is written straight into the decode's pool "
                        "(shared memory, CUDA IPC), UCX elsewhere; ucx: always UCX [PDMESH_KV_TRANSFER_PATH]")
    p.add_argument("--devices", default=env("DEVICES", ""),
                   help="comma-separated torch devices, one per rank or one for all (e.g. cuda:0,cuda:1)")
    if role != PREFILL:
        p.add_argument("--bootstrap-addr", default=env("BOOTSTRAP_ADDR"),
                       help="pre-link: each rank links to every prefill rank this bootstrap service "
                            "lists (host:port) before it reports ready and as new ones register, so "
                            "a first request finds its KV link wired [PDMESH_BOOTSTRAP_ADDR]")
    if role == PREFILL:
        p.add_argument("--bootstrap-port", type=int, default=_int(env("BOOTSTRAP_PORT")),
                       help="embed a bootstrap service on this port (0 = a free one)")
        p.add_argument("--bootstrap-addr", default=env("BOOTSTRAP_ADDR"),
                       help="or register at this external bootstrap service (host:port)")
        p.add_argument("--force-query-prefill-dp-rank", action="store_true",
                       default=env_flag("FORCE_QUERY_PREFILL_DP_RANK"),
                       help="every rank registers every room, even under follow_bootstrap_room "
                            "[PDMESH_FORCE_QUERY_PREFILL_DP_RANK=1]")
        p.add_argument("--transfer-wait-s", type=float, default=float(env("TRANSFER_WAIT_S", "30")),
                       help="how long a computed room waits for the decode's transfer request")
        p.add_argument("--layer-streaming", action=argparse.BooleanOptionalAction,
                       default=(env("LAYER_STREAMING", "1") or "1").strip().lower()
                       not in {"0", "false", "no", "off"},
                       help="offer each room before computing it and send every layer's KV as "
                            "soon as it is final (default on) [PDMESH_LAYER_STREAMING=0 turns it off]")
        p.add_argument("--transfer-host", default=env("TRANSFER_HOST"),
                       help="address the ranks' UCX listeners publish for decodes to fetch KV from "
                            "(default: --host, or 127.0.0.1 when --host is a wildcard) [PDMESH_TRANSFER_HOST]")
    add_engine_arguments(p)
    tls.add_arguments(p)
    metrics.add_arguments(p)


def _int(text: str | None) -> int | None:
    return None if text in (None, "") else int(text)


def _transfer_host(args: argparse.Namespace) -> str:
    """What the UCX listeners publish: the flag, else the bound host unless it is a wildcard."""
    if args.transfer_host:
        return args.transfer_host
    return "127.0.0.1" if args.host in ("", "0.0.0.0", "::", "[::]") else args.host


def config_from_args(args: argparse.Namespace, role: str) -> InstanceConfig:
    extra = {}
    if role == PREFILL:
        extra = dict(bootstrap_port=args.bootstrap_port, bootstrap_address=args.bootstrap_addr,
                     force_query_prefill_dp_rank=args.force_query_prefill_dp_rank,
                     transfer_wait_s=args.transfer_wait_s, transfer_host=_transfer_host(args),
                     layer_streaming=args.layer_streaming)
    else:
        extra = dict(bootstrap_address=args.bootstrap_addr or None)
    devices = tuple(d for d in args.devices.split(",") if d)
    return InstanceConfig(
        role=role, instance_id=args.instance_id or f"{role}-{socket.gethostname()}-{os.getpid()}",
        host=args.host, port=args.port, dp_size=args.dp_size, load_balance_method=args.load_balance_method,
        engine=spec_from_args(args), num_pages=args.num_pages, max_running_requests=args.max_running_requests,
        ucx_tls=args.ucx_tls, kv_transfer_path=args.kv_transfer_path, devices=devices,
        debug_kv_dir=env("DEBUG_KV_DIR"), tls=tls.from_args(args),
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, page_wait_s=args.page_wait_s,
        kv_min_chunks=args.kv_min_chunks,
        **extra)


def run(args: argparse.Namespace, role: str) -> int:
    from pdmesh.errors import PdmeshError
    from pdmesh.worker.engine.factory import check_model
    from pdmesh.worker.instance.instance import serve
    from pdmesh.worker.transfer.layers import gpu_stream_chunks
    try:
        config = config_from_args(args, role)
        gpu_stream_chunks()  # a bad PDMESH_GPU_STREAM_CHUNKS: one message now, not every prefill
        # The model is resolved (a named one converted into the cache, once) and checked here,
        # before any rank starts: a bad model is one clear message, never ranks dying in a loop.
        print(f"pdmesh {role}: model {check_model(config.engine)}", flush=True)
    except ValueError as exc:  # inconsistent TLS flags, a bad tuning variable (not InvalidArgument)
        print(f"pdmesh {role}: {exc}", file=sys.stderr)
        return 2
    except PdmeshError as exc:  # a model that cannot load: missing, damaged, unsupported
        print(f"pdmesh {role}: {exc.reason}: {exc.message}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config))
