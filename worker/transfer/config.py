"""Settings of the KV data plane: the transfer knobs, and the UCX environment pdmesh sets itself.

`TransferConfig` is a frozen dataclass passed to `KvSender` / `KvReceiver` (the rank's entry point
builds it from flags and `PDMESH_*` variables). `apply_ucx_defaults()` writes the UCX settings
that make transfers fast and failures visible into `os.environ` BEFORE ucxx is imported (UCX
reads them once, when its context is created); a variable already present in the environment is
left alone, so an operator overrides any of them by exporting it (see README, "KV transfer").
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass, replace

MiB = 1 << 20

# What each setting is for (numbers: README's transfer benchmark and shared/MEASURED.md):
UCX_DEFAULTS: dict[str, str] = {
    # Progress UCX from the rank's event loop, woken by UCX's epoll fd. ucxx's default, a progress
    # thread, fights the loop for the GIL and halved throughput on 2 cores.
    "UCXPY_PROGRESS_MODE": "blocking",
    # ucxx endpoints ask for peer-failure handling (how a dead peer is detected); UCX's shared
    # memory transports refuse such endpoints unless this is set on BOTH sides, and traffic
    # then silently falls back to tcp.
    "UCX_MM_ERROR_HANDLING": "y",
    # Shared memory within a host, tcp between hosts (and for connection set-up); add rc/ud/dc
    # (InfiniBand, RoCE) or cuda_copy,cuda_ipc (GPU memory) on machines that have them.
    "UCX_TLS": "sm,self,tcp",
    # UCX's older protocol selection (v1). With v2 (the 1.21 default) a tagged rendezvous over tcp
    # goes through "fragmented copy-in copy-out" (bounce buffers) and carried ~1.2 GB/s here,
    # ucx_perftest tag_bw included; v1 uses the zero-copy rendezvous: ~3.2 GB/s, and more with
    # shared memory too (README, transfer benchmark). ucxx itself sets this for UCX < 1.18.
    "UCX_PROTO_ENABLE": "n",
    # ucxx sets UCX_MEMTYPE_CACHE, which UCX 1.21 no longer reads; don't warn about it.
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    # tcp only (no effect on sm, rc/dc/ud or CUDA transports): a rendezvous over tcp moves its
    # data as active-message fragments of at most the receive segment (64 KiB by default, and 8
    # KiB send segments), each a syscall and a UCX handler call on both sides, which cost more
    # CPU than the bytes on a loaded host. 512 KiB segments: 1 MiB messages in two fragments,
    # not sixteen; a worker then holds a few MiB of segment buffers (README, UCX table).
    "UCX_TCP_TX_SEG_SIZE": "512K",
    "UCX_TCP_RX_SEG_SIZE": "512K",
}


def apply_ucx_defaults(environ: MutableMapping[str, str] | None = None,
                       device: str = "cpu") -> dict[str, str]:
    """Set every UCX default the environment does not already set (with the CUDA ones where
    the rank's pools are on a GPU); return the effective values."""
    env = os.environ if environ is None else environ
    defaults = dict(UCX_DEFAULTS)
    if str(device).startswith("cuda"):
        defaults.update(UCX_GPU_DEFAULTS)
    for key, value in defaults.items():
        env.setdefault(key, value)
    return {key: env[key] for key in defaults}

# What changes for a rank whose pools are CUDA memory (README, "CUDA memory over UCX"):
UCX_GPU_DEFAULTS: dict[str, str] = {
    # UCX's CUDA transports: cuda_ipc moves device memory between processes of a host (and over
    # NVLink), cuda_copy stages it where no peer mapping exists.
    "UCX_TLS": "cuda_copy,cuda_ipc,sm,self,tcp",
    # Protocol v2 for CUDA memory: a bare ucxx send of one CUDA buffer, two processes on one
    # GPU, moved 256 GB/s (1 GiB) and 336 GB/s (64 MiB) with v2 against 116-127 and 144-189 with
    # v1 (H200, 2026-12-06); v1 stays for host memory (tcp, above).
    "UCX_PROTO_ENABLE": "y",
}
# Every CUDA message through ucxx cost 0.25-0.45 ms of latency whatever its size (64 in-place
# messages per request moved 4-5 GB/s at 64 MiB, packed 64 MiB chunks 17 GB/s): on the GPU a
# transfer packs (the kernel moves ~2.6 TB/s) into few large messages and sends nothing in place.
GPU_CHUNK_BYTES = 256 * MiB
GPU_WINDOW_BYTES = 1024 * MiB


@dataclass(frozen=True)
class TransferConfig:
    """Knobs of one rank's KV transfers (both roles)."""

    chunk_bytes: int = 8 * MiB
    """Target size of one chunk (a range of layers) of a request; the receiver picks how many
    layers make one chunk (at least one) and tells the sender in its request. Each chunk is one
    rendezvous: 2 MiB chunks cost ~1.5x the CPU of 8-16 MiB ones here (README)."""
    min_chunks: int = 8
    """At least this many chunks per request (fewer layers each, where the request has that many
    layers): with layer streaming a chunk leaves once its last layer is computed, so the part of
    a transfer left after the prefill ends is about one chunk (README, TTFT benchmark)."""
    send_depth: int = 2
    """Chunks one transfer prepares ahead on the sender (checksums, packing): packing chunk i+1
    overlaps sending i."""
    send_window_bytes: int = 16 * MiB
    """Bytes of messages one transfer keeps on the wire at once (at least one message)."""
    direct_min_bytes: int = 256 * 1024
    """A run of pages that is contiguous in both pools travels in place (sent from and received
    into the pools, one message per layer and K/V, no pack or unpack) when it holds at least
    this many bytes per layer and K/V; shorter runs are packed (worker/transfer/runs.py). The
    receiver's setting (and `max_direct_runs`) travels in its request: both sides plan alike."""
    max_direct_runs: int = 16
    """At most this many runs of a request travel in place (the longest); the rest is packed:
    every direct run adds a message per layer and K/V."""
    recv_window: int = 2
    """Chunk receives one transfer keeps posted on the receiver: unpacking i overlaps receiving
    the next ones."""
    connect_timeout_s: float = 5.0
    """Deadline of connecting to a peer's listener (part of BOOTSTRAPPING)."""
    answer_timeout_s: float = 10.0
    """How long a link may stay silent after a transfer request before the receiver takes the
    request as lost (and the grace it adds to the wait the sender announced): a request or answer
    lost on the way costs this bound, never the request's deadline. A sender that keeps answering
    other requests on the link is alive and is waited for (under a 1,000-request burst on 2 cores
    a rank's answers came more than 5 s late)."""
    room_wait_s: float = 5.0
    """How long the sender holds a request for a room that is not offered (the decode may come
    first) before it answers NOT_FOUND; `KvSender.expect(room, ...)` extends it for one room."""
    transfer_timeout_s: float = 60.0
    """Deadline of the TRANSFERRING state of one transfer (capped by the caller's deadline); on
    the receiver, renewed by every chunk that lands (a streamed prefill may still be computing
    later layers); an offer made before compute gets it once its compute ended."""
    abort_grace_s: float = 5.0
    """After a transfer fails, how long to wait for its in-flight UCX requests to finish or be
    cancelled before closing the link to that peer (which cancels them); its buffers and pages
    stay out of use until then."""
    staging_cache_bytes: int = 1024 * MiB
    """Staging buffers kept for reuse (first-touch page faults cost ~10x a copy here)."""
    copy_threads: int = 1
    """Threads that pack and unpack (torch releases the GIL; the event loop keeps UCX moving)."""
    same_host_copy_threads: int = 2
    """Same host, CPU pools: threads that share one chunk's copy, each a slice of its layers (the
    compiled copy releases the GIL). The decode waits idle meanwhile, so on a 2-core host two
    threads use the core it leaves; 1 copies on one thread."""
    advertise_host: str = "127.0.0.1"
    """Host the sender publishes in its address (the listener binds every interface)."""
    listen_port: int = 0
    """Port of the sender's UCX listener; 0 lets the OS choose."""
    path: str = "auto"
    """How KV moves: "auto" writes straight into the peer's pool where both ranks share a host
    and can map it (samehost.py), UCX elsewhere; "ucx" always uses UCX. Entry points set it from
    --kv-transfer-path / PDMESH_KV_TRANSFER_PATH."""
    same_host_verify: bool = False
    """Same host: the receiver also re-reads its pages after the trailer and checks the writer's
    checksum (taken in the copy pass). Off by default: it is a second pass over every byte
    (README, transfer benchmark, gives its cost); the trailer's token, first token and byte count
    are always checked."""

    def for_device(self, device: str) -> "TransferConfig":
        """These settings with the chunking measured for pools on `device` ("cuda...": packed
        chunks of `GPU_CHUNK_BYTES`, nothing in place, a GiB in flight; see above). On a GPU a
        request has at most as many chunks as a streamed prefill reports chunk ends
        (layers.gpu_stream_chunks(), 1 by default; a chunk stays at most GPU_CHUNK_BYTES): a
        smaller chunk cannot leave sooner, and each costs a CUDA message (1 GiB over UCX on the
        H100: 7.45 ms in 8 chunks, 5.2-5.5 in 4, 2 or 1)."""
        if not str(device).startswith("cuda"):
            return self
        from pdmesh.worker.transfer.layers import gpu_stream_chunks

        return replace(self, chunk_bytes=max(self.chunk_bytes, GPU_CHUNK_BYTES),
                       min_chunks=min(self.min_chunks, gpu_stream_chunks()),
                       send_window_bytes=max(self.send_window_bytes, GPU_WINDOW_BYTES),
                       recv_window=max(self.recv_window, GPU_WINDOW_BYTES // GPU_CHUNK_BYTES),
                       send_depth=max(self.send_depth, 4), max_direct_runs=0)

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "min_chunks", "send_depth", "recv_window", "copy_threads",
                     "same_host_copy_threads", "send_window_bytes", "direct_min_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransferConfig.{name} must be >= 1")
        for name in ("connect_timeout_s", "answer_timeout_s", "room_wait_s", "transfer_timeout_s",
                     "abort_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TransferConfig.{name} must be > 0")
        if self.path not in ("auto", "ucx"):
            raise ValueError(f"TransferConfig.path must be auto or ucx, got {self.path!r}")
