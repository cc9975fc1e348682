"""The same-host path: the prefill writes a room's pages straight into the decode's pool.

When a prefill rank and a decode rank share a host, no byte needs a wire. Per link and pool:

1. The receiver (decode) sends `SameHostHello` once, on the first fetch of a pool over a link:
   its host id (kernel boot id and pid namespace), pid, layout, and how to map the pool
   (worker/kv/shm_pool.py: a memfd of a CPU pool with a nonce, or a CUDA IPC handle).
2. The sender (prefill) maps it if it can and answers `SameHostReady` (or why not). Anything
   that fails (another host, another pid namespace, no permission, a CPU pool not in shared
   memory, a CUDA pool on the other side of a CPU one, `PDMESH_KV_TRANSFER_PATH=ucx`) leaves the
   link on UCX: the path is chosen per link and falls back by itself.
3. A request then names the pool and its destination pages (`TransferRequest.same_host`). After
   its OK status the sender copies layer chunk by chunk, pages from its pool into the mapped one
   (samehost_copy.py: CPU, a compiled copy split over two threads; CUDA, one Triton launch per
   chunk on a copy stream behind the chunk's layer event, one host wait per transfer), the
   checksum taken in the same pass, and ends with exactly one message: the trailer, or a
   TransferAbort sent only once no copy runs any more.
4. The receiver checks the trailer (token, first token, byte count; DATA_LOSS on a mismatch).
   On a failure after OK it waits for the sender's last message before its pages may go back to
   the pool; a sender that stays silent for `abort_grace_s` gets its link closed (a dead sender
   writes nothing more; the mapping goes with its process). Deadlines, aborts both ways and the
   per-transfer token are those of the UCX path (sender.py, receiver.py).

`PDMESH_KV_TRANSFER_PATH` (`auto`, the default, or `ucx`) is read by the entry points into
`TransferConfig.path`; `ucx` makes both sides skip this path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from pdmesh.errors import DataLoss, FailedPrecondition, InvalidArgument, PdmeshError
from pdmesh.reasons import Reason
from pdmesh.transfer.v1 import transfer_pb2 as pb
from pdmesh.worker.kv import shm_pool
from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.kv.pack import checked_page_array
from pdmesh.worker.kv.page_copy import CopyPlan, checksum_pages
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.transfer import samehost_copy, wire
from pdmesh.worker.transfer.layers import stream_chunk_layers

log = logging.getLogger(__name__)
PATH_ENV = "PDMESH_KV_TRANSFER_PATH"
# CPU writer's chunk: each chunk costs one strided copy and one sum per run of pages, so chunks
# are large (an abort still stops within one chunk: ~10-30 ms here).
CPU_CHUNK_BYTES = 128 << 20
PATHS = ("auto", "ucx")


def check_path(value: str) -> str:
    """`value` if it names a transfer path, else INVALID_ARGUMENT naming the choices."""
    if value not in PATHS:
        raise InvalidArgument(f"KV transfer path {value!r} is not one of {', '.join(PATHS)} "
                              f"(--kv-transfer-path / {PATH_ENV})", reason=Reason.INVALID_TRANSFER_PATH)
    return value


def path_from_env(default: str = "auto") -> str:
    """For entry points only: `PDMESH_KV_TRANSFER_PATH`, checked."""
    return check_path(os.environ.get(PATH_ENV, default).strip().lower() or default)


def host_id() -> str:
    """This kernel and pid namespace: processes that may map each other's pools share it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""  # no /proc: never same host
    return f"{socket.gethostname()}/{boot}/{pidns}"


# -- the receiver's side ----------------------------------------------------------------------

class SameHostReceiver:
    """Offers this rank's pools to its peers; knows per (link, pool) whether one mapped it."""

    def __init__(self, path: str, answer_timeout_s: float) -> None:
        self.enabled = check_path(path) == "auto"
        self._answer_timeout = answer_timeout_s
        self._pool_ids: weakref.WeakKeyDictionary[KvPool, int] = weakref.WeakKeyDictionary()
        self._answers: dict[tuple[int, int], asyncio.Future] = {}  # (link, pool id) -> bool

    async def target(self, link, pool: KvPool) -> int | None:
        """The pool id to name in requests over `link`, or None: use chunks (UCX)."""
        if not self.enabled:
            return None
        pool_id = self._pool_ids.get(pool)
        if pool_id is None:
            pool_id = self._pool_ids[pool] = secrets.randbits(64)
        key = (id(link), pool_id)
        answer = self._answers.get(key)
        if answer is None:
            hello = _hello(pool, pool_id)
            answer = self._answers[key] = asyncio.get_running_loop().create_future()
            if hello is None:
                answer.set_result(False)
            else:
                await link.send_control(wire.encode(pb.TransferMessage(same_host_hello=hello)))
        if not answer.done():  # else known since the link's first fetch of this pool
            try:
                await asyncio.wait_for(asyncio.shield(answer), self._answer_timeout)
            except asyncio.TimeoutError:  # a sender that does not know this path never answers
                if not answer.done():
                    answer.set_result(False)
        return pool_id if answer.result() else None

    def known(self, link, pool: KvPool) -> tuple[bool, int | None]:
        """(True, what `target` returns) once the link's answer for `pool` is in (no await on a
        fetch's hot path), else (False, None)."""
        if not self.enabled:
            return True, None
        pool_id = self._pool_ids.get(pool)
        answer = self._answers.get((id(link), pool_id))
        if answer is None or not answer.done():
            return False, None
        return True, pool_id if answer.result() else None

    def mapped(self, link, pool: KvPool) -> bool:
        """Whether requests for `pool` over `link` go the same-host way."""
        return self.known(link, pool)[1] is not None

    def on_ready(self, link, ready: pb.SameHostReady) -> None:
        answer = self._answers.get((id(link), ready.pool_id))
        if answer is None or answer.done():
            return
        if ready.HasField("status"):
            log.info("KV to %s goes over UCX: %s", link.peer, ready.status.message)
        else:
            log.info("KV from %s is written straight into this rank's pool (same host)", link.peer)
        answer.set_result(not ready.HasField("status"))

    def link_closed(self, link) -> None:
        for key in [k for k in self._answers if k[0] == id(link)]:
            answer = self._answers.pop(key)
            if not answer.done():
                answer.set_result(False)


def _hello(pool: KvPool, pool_id: int) -> pb.SameHostHello | None:
    try:
        desc = shm_pool.export(pool.kv)
    except Exception as err:  # noqa: BLE001 - no IPC here (driver, permissions): UCX then
        log.info("this rank's pool cannot be shared (%s): KV arrives over UCX", err)
        return None
    if desc is None:
        return None  # a private CPU pool: nothing to map
    return pb.SameHostHello(
        pool_id=pool_id, host_id=host_id(), pid=desc.pid, layout=pool.layout.to_proto(),
        num_pages=pool.num_pages, kind=desc.kind, fd=desc.fd, nbytes=desc.nbytes,
        offset=desc.offset, nonce=desc.nonce, cuda_handle=desc.cuda_handle)


def checksum_of(kv: torch.Tensor, ids: torch.Tensor, plan: wire.ChunkPlan) -> int:
    """Worker thread: the transfer checksum of pages `ids` as they are now (what the writer's
    trailer says it wrote; page_copy.py: it does not depend on how the writer chunked)."""
    return checksum_pages(kv, ids, 0, plan.layout.num_layers)


def verify_trailer(trailer: pb.TransferTrailer, total_bytes: int, token: bytes,
                   checksum: int | None = None) -> None:
    """The trailer of a same-host transfer: first token, byte count, token, and the checksum
    when the receiver computed one (DATA_LOSS)."""
    import hmac

    problems = {}
    if not trailer.HasField("first_token"):
        problems["first_token"] = "missing"
    if not hmac.compare_digest(trailer.token, token):
        problems["token"] = "differs"
    if trailer.byte_count != total_bytes:
        problems["bytes"] = f"expected {total_bytes}, trailer {trailer.byte_count}"
    if checksum is not None and trailer.checksum != checksum:
        problems["checksum"] = f"trailer {trailer.checksum:#x}, pages {checksum:#x}"
    if problems:
        raise DataLoss("KV transfer arrived damaged (" + "; ".join(
            f"{k}: {v}" for k, v in problems.items()) + "); nothing was committed, retry the "
            "request", reason=Reason.KV_TRANSFER_CORRUPT, metadata=problems)


# -- the sender's side ------------------------------------------------------------------------

@dataclass(eq=False)
class _Mapped:
    peer: shm_pool.PeerPool
    layout: KvLayout
    num_pages: int
    users: int = 0
    closing: bool = False


class SameHostSender:
    """The peers' pools this rank mapped, per link."""

    def __init__(self, path: str) -> None:
        self.enabled = check_path(path) == "auto"
        self._maps: dict[tuple[int, int], _Mapped] = {}
        self._host = host_id()

    async def on_hello(self, link, hello: pb.SameHostHello, device: torch.device | None,
                       executor) -> pb.SameHostReady:
        """Map the pool of `hello` if possible (in `executor`, off the event loop: opening a
        file or a CUDA IPC handle may block); the answer to send back."""
        ready = pb.SameHostReady(pool_id=hello.pool_id, pid=os.getpid())
        try:
            layout = self._check_hello(hello, device)
            shape = (layout.num_layers, 2, hello.num_pages, layout.page_size,
                     layout.num_kv_heads, layout.head_dim)
            desc = shm_pool.PoolExport(hello.kind, hello.pid, hello.nbytes, hello.fd,
                                       hello.offset, hello.nonce, hello.cuda_handle)
            peer = await asyncio.get_running_loop().run_in_executor(
                executor, shm_pool.map_peer, desc, shape, layout.dtype, device)
            self._add(link, hello, peer, layout)
        except PdmeshError as err:
            ready.status.CopyFrom(wire.failure_to_proto(err))
        except Exception as err:  # noqa: BLE001 - any mapping fault leaves the link on UCX
            log.warning("cannot map the pool of %s: %s", link.peer, err)
            ready.status.CopyFrom(wire.failure_to_proto(FailedPrecondition(
                f"mapping failed: {type(err).__name__}: {err}", reason=Reason.KV_SAME_HOST_MAP_FAILED)))
        return ready

    def _check_hello(self, hello: pb.SameHostHello, device: torch.device | None) -> KvLayout:
        if not self.enabled:
            raise FailedPrecondition("this rank sends KV over UCX only (PDMESH_KV_TRANSFER_PATH"
                                     "=ucx)", reason=Reason.KV_SAME_HOST_OFF)
        if not self._host or hello.host_id != self._host:
            raise FailedPrecondition("not the same host and pid namespace",
                                     reason=Reason.KV_SAME_HOST_OTHER_HOST)
        if device is None:
            raise FailedPrecondition("this rank has no pool yet", reason=Reason.KV_SAME_HOST_NO_POOL)
        return KvLayout.from_proto(hello.layout)

    def _add(self, link, hello: pb.SameHostHello, peer: shm_pool.PeerPool,
             layout: KvLayout) -> None:
        if link.closed:  # closed while mapping: nothing will use it
            peer.close()
            raise FailedPrecondition("the link closed while the pool was mapped",
                                     reason=Reason.KV_SAME_HOST_NOT_MAPPED)
        old = self._maps.pop((id(link), hello.pool_id), None)
        self._maps[(id(link), hello.pool_id)] = _Mapped(peer, layout, hello.num_pages)
        if old is not None:
            self._release(old)

    def target(self, link, request: pb.TransferRequest, layout: KvLayout,
               src_device: torch.device) -> tuple[_Mapped, torch.Tensor]:
        """The mapped pool and destination ids a request names, checked (a CPU tensor), or
        FAILED_PRECONDITION / INVALID_ARGUMENT."""
        mapped = self._maps.get((id(link), request.same_host.pool_id))
        if mapped is None or mapped.closing:
            raise FailedPrecondition("the request names a pool this rank has not mapped; "
                                     "the decode offers it again on a new link",
                                     reason=Reason.KV_SAME_HOST_NOT_MAPPED)
        mapped.layout.check_compatible(layout)
        if mapped.peer.kv.device.type != src_device.type:
            raise FailedPrecondition(f"the decode's pool is on {mapped.peer.kv.device.type}, "
                                     f"this rank's on {src_device.type}",
                                     reason=Reason.KV_SAME_HOST_DEVICE_MISMATCH)
        packed = request.same_host.page_ids_u32le
        if len(packed) != 4 * request.num_pages:
            raise InvalidArgument(f"the request's destination page ids take {len(packed)} bytes; "
                                  f"its {request.num_pages} pages take {4 * request.num_pages}",
                                  reason=Reason.INVALID_PAGE_IDS)
        try:  # uint32: never negative; one array, no Python int per page
            ids = checked_page_array(mapped.peer.kv, np.frombuffer(packed, dtype="<u4"), unique=True)
        except InvalidArgument:
            raise InvalidArgument("destination page ids out of range or repeated",
                                  reason=Reason.INVALID_PAGE_IDS) from None
        # on the host: the copier moves them to the device on its own stream, without a wait
        return mapped, torch.from_numpy(ids)

    def hold(self, mapped: _Mapped) -> None:
        mapped.users += 1

    def release(self, mapped: _Mapped) -> None:
        mapped.users -= 1
        if mapped.closing and mapped.users == 0:
            mapped.peer.close()

    def _release(self, mapped: _Mapped) -> None:
        mapped.closing = True
        if mapped.users == 0:
            mapped.peer.close()

    def link_closed(self, link) -> None:
        """Unmap the link's pools once no copy uses them."""
        for key in [k for k in self._maps if k[0] == id(link)]:
            self._release(self._maps.pop(key))

    def close(self) -> None:
        for key in list(self._maps):
            self._release(self._maps.pop(key))


def packed_ids(ids: np.ndarray) -> bytes:
    """Checked destination page ids as a request carries them (SameHostTarget.page_ids_u32le)."""
    return ids.astype("<u4").tobytes()


async def write(link, request: pb.TransferRequest, offer, mapped: _Mapped, dst_ids: torch.Tensor,
                sender: SameHostSender, executor, threads: int = 1) -> None:
    """Serve an accepted same-host request: copy chunk by chunk into the mapped pool
    (samehost_copy.py: CPU threads, or launches on a CUDA stream), then the trailer; on failure,
    a TransferAbort once no copy runs any more (the receiver waits for it before its pages may
    return to the pool)."""
    status, tid = offer.status, request.transfer_id
    plan = wire.ChunkPlan(offer.pool.layout, len(offer.page_ids), _layers_per_chunk(request, offer))
    src_ids = torch.from_numpy(offer.page_ids)  # checked when offered
    copier = samehost_copy.make_copier(offer.pool.kv, mapped.peer.kv, CopyPlan(src_ids, dst_ids),
                                       executor, threads)
    total = 0
    sender.hold(mapped)
    try:
        try:
            for index, (a, b) in enumerate(plan.ranges):
                if mapped.closing and not status.terminal:  # its link closed: unmapped, or soon
                    status.fail(FailedPrecondition("the decode's pool was unmapped (its link "
                                                   "closed)", reason=Reason.KV_SAME_HOST_NOT_MAPPED))
                if status.terminal:
                    break
                mark = await status.guard(offer.wait_layers(b, on_host=False))  # [a, b) final
                await copier.chunk(status, a, b, plan.chunk_bytes(index), mark)
                total += plan.chunk_bytes(index)
        finally:
            acc = await copier.settle()  # no copy runs any more
        if not status.terminal:
            await wire.send_trailer(link, status, tid, offer, total, acc)
            return
    except PdmeshError as err:
        status.fail(err)
    except Exception as err:  # noqa: BLE001 - a bug fails the transfer typed, now
        status.fail(wire.unexpected(err, f"the same-host KV writer of room {request.room}"))
    finally:
        sender.release(mapped)
    if not link.closed:  # no copy runs any more: say so, whoever failed first
        abort = pb.TransferAbort(transfer_id=tid, status=wire.failure_to_proto(status.error))
        try:
            await link.send_control(wire.encode(pb.TransferMessage(abort=abort)))
        except PdmeshError:
            pass


def _layers_per_chunk(request: pb.TransferRequest, offer) -> int:
    """CPU: the receiver's chunking while the room still computes (each chunk leaves once its
    layers are final), a computed room in chunks of about CPU_CHUNK_BYTES (an abort stops
    within one). CUDA: a streamed room in the chunks its reporter reports, a computed one in
    one launch for every layer."""
    layers = request.layers_per_chunk
    if offer.pool.kv.is_cuda:  # streamed: the chunks the compute reports (layers.py)
        return (stream_chunk_layers(offer.pool.layout.num_layers) if not offer.layers.done
                else offer.pool.layout.num_layers)
    if not offer.layers.done:
        return layers
    return max(layers, wire.ChunkPlan.layers_for(offer.pool.layout, len(offer.page_ids),
                                                 CPU_CHUNK_BYTES))


async def wait_for_writer(ended: asyncio.Future, link, grace_s: float) -> None:
    """Receiver, after a failure once the sender accepted: return when the sender has said it
    writes no more (trailer or abort) or its link is closed. A sender silent for `grace_s`
    gets its link closed (as a stuck UCX peer does)."""
    if ended.done() or link.closed:
        return
    await asyncio.wait({ended}, timeout=grace_s)
    if not ended.done() and not link.closed:
        from pdmesh.errors import Unavailable

        log.warning("same-host sender %s did not confirm it stopped writing within %.1f s: "
                    "closing the link", link.peer, grace_s)
        link.close(Unavailable(f"{link.peer} did not stop writing within {grace_s:.1f} s of an "
                               "abort", reason=Reason.KV_TRANSFER_PEER_STUCK))
