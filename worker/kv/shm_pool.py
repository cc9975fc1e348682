"""KV pool memory that a process of the same host can map: shared CPU memory, CUDA IPC.

A decode rank's pool is written straight into by the prefill ranks of its host (the same-host
transfer path, worker/transfer/samehost.py). This module owns the memory side of that:

- CPU: `shared_zeros(shape, dtype)` allocates the pool tensor in an anonymous shared-memory file
  (`memfd_create`): it has no name, nothing of it is ever in /dev/shm, and the kernel frees it
  when the last process that maps it or holds its descriptor is gone (kill -9 included). A page
  of 4 KiB in front of the pool holds a random nonce. `export(kv)` describes it; a peer maps it
  with `map_peer(desc)` by opening `/proc/<pid>/fd/<fd>` of the owner (same host, same pid
  namespace, the owner's user or root) and checks the nonce, so a pid that means another process
  (another pid namespace, a container) never maps the wrong memory. Both sides fault the pages in
  ahead of the transfers, each in a background thread (`prefault`: MADV_POPULATE_WRITE through
  libc, the GIL released, 64 MiB a step): the owner from the pool's creation on, the peer from the
  moment it maps the pool at link set-up, which stays fast (a first copy runs meanwhile and
  faults what it touches itself). Measured here: the first 64 MiB copy into a fresh mapping took
  4-8x a warm one; mapping page tables of an allocated pool costs ~0.1 ms per MiB.
- CUDA: any pool tensor from torch's allocator is exported with the driver's IPC calls
  (`cuIpcGetMemHandle` on the allocation, plus the pool's offset in it) and mapped with
  `cuIpcOpenMemHandle` (lazy peer access: a peer GPU of the same host maps it over NVLink/PCIe);
  no file is made (torch's own `_share_cuda_` keeps a reference-count file in /dev/shm, which a
  killed process leaves behind, so it is not used).

A mapping (`PeerPool`) is a tensor shaped like the peer's pool; `close()` unmaps it once nothing
uses it any more (the CUDA handle is closed, the CPU mapping goes with its last reference).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import threading
from dataclasses import dataclass

import torch

from pdmesh.errors import FailedPrecondition
from pdmesh.reasons import Reason

HEADER = 4096
NONCE_BYTES = 16
MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python 3.11's mmap does not name it
PREFAULT_STEP = 64 << 20
_SEGMENTS: dict[int, "_Segment"] = {}  # data_ptr of a shared pool tensor -> its segment
_LOCK = threading.Lock()


class MapError(FailedPrecondition):
    """The peer's pool cannot be mapped here (the link then uses UCX)."""

    default_reason = Reason.KV_SAME_HOST_MAP_FAILED


@dataclass
class PoolExport:
    """What a peer needs to map a pool (travels in a SameHostHello)."""

    kind: str  # "cpu" or "cuda"
    pid: int
    nbytes: int
    fd: int = 0
    offset: int = 0
    nonce: bytes = b""
    cuda_handle: bytes = b""


class _Segment:
    def __init__(self, nbytes: int) -> None:
        self.fd = os.memfd_create("pdmesh-kv-pool", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, HEADER + nbytes)
        self.map = mmap.mmap(self.fd, HEADER + nbytes)
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.map[:NONCE_BYTES] = self.nonce
        self.nbytes = nbytes


def prefault(kv: torch.Tensor, stop: threading.Event) -> None:
    """Fault every page of the shared mapping under `kv` in, writable (allocating what the file
    does not hold yet), `PREFAULT_STEP` bytes a call until done or `stop` is set. The caller
    holds `kv`, so the mapping outlives this. A kernel without MADV_POPULATE_WRITE (< 5.14)
    leaves it to the first touch."""
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    start = kv.data_ptr() // page * page
    end = kv.data_ptr() + kv.numel() * kv.element_size()
    while start < end and not stop.is_set():
        length = min(PREFAULT_STEP, end - start)
        if libc.madvise(start, length, MADV_POPULATE_WRITE) != 0:
            return
        start += length


def prefault_in_background(kv: torch.Tensor) -> threading.Event:
    """`prefault(kv)` in a daemon thread; set the returned event to stop it early."""
    stop = threading.Event()
    threading.Thread(target=prefault, args=(kv, stop), name="pdmesh-kv-prefault",
                     daemon=True).start()
    return stop


def shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in shared memory that `export` can describe to a peer."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    segment = _Segment(max(nbytes, 1))
    flat = torch.frombuffer(segment.map, dtype=torch.uint8, count=nbytes, offset=HEADER)
    tensor = flat.view(dtype).view(shape)
    with _LOCK:
        _SEGMENTS[tensor.data_ptr()] = segment
    prefault_in_background(tensor)  # pages committed now, off the request path
    return tensor


def export(kv: torch.Tensor) -> PoolExport | None:
    """How a peer maps `kv`, or None where it cannot (a private CPU tensor)."""
    nbytes = kv.numel() * kv.element_size()
    if kv.is_cuda:
        handle, offset = _cuda().export(kv)
        return PoolExport("cuda", os.getpid(), nbytes, offset=offset, cuda_handle=handle)
    with _LOCK:
        segment = _SEGMENTS.get(kv.data_ptr())
    if segment is None or segment.nbytes < nbytes:
        return None
    return PoolExport("cpu", os.getpid(), nbytes, fd=segment.fd, offset=HEADER,
                      nonce=segment.nonce)


class PeerPool:
    """A peer's pool, mapped into this process: `kv` has the peer's pool shape and dtype."""

    def __init__(self, kv: torch.Tensor, closer=None, stop: threading.Event | None = None
                 ) -> None:
        self.kv = kv
        self._closer = closer
        self._stop = stop  # of its prefault thread (CPU)

    def close(self) -> None:
        """Unmap (call only when no copy uses `kv` any more)."""
        if self._stop is not None:
            self._stop.set()
        closer, self._closer = self._closer, None
        self.kv = None  # type: ignore[assignment]
        if closer is not None:
            closer()


def map_peer(desc: PoolExport, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> PeerPool:
    """Map a peer's pool; MapError (FAILED_PRECONDITION) when this process cannot."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    if numel * itemsize != desc.nbytes:
        raise MapError(f"peer pool of {desc.nbytes} bytes does not match its layout "
                       f"({numel * itemsize} bytes)")
    if desc.kind == "cpu":
        if device.type != "cpu":
            raise MapError("a CPU pool cannot be written from a CUDA pool")
        return _map_cpu(desc, shape, dtype)
    if desc.kind == "cuda":
        if device.type != "cuda":
            raise MapError("a CUDA pool cannot be written from a CPU pool")
        return _cuda().map(desc, shape, dtype, device)
    raise MapError(f"unknown pool kind {desc.kind!r}")


def _map_cpu(desc: PoolExport, shape: tuple[int, ...], dtype: torch.dtype) -> PeerPool:
    path = f"/proc/{desc.pid}/fd/{desc.fd}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise MapError(f"cannot open the peer's pool at {path}: {err.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size < desc.offset + desc.nbytes or desc.offset < NONCE_BYTES:
            raise MapError(f"{path} holds {size} bytes, the pool needs {desc.offset + desc.nbytes}")
        region = mmap.mmap(fd, desc.offset + desc.nbytes)
    finally:
        os.close(fd)
    if region[:NONCE_BYTES] != desc.nonce:
        region.close()
        raise MapError(f"{path} is not the peer's pool (another process under that pid: a "
                       "different pid namespace or host)")
    flat = torch.frombuffer(region, dtype=torch.uint8, count=desc.nbytes, offset=desc.offset)
    kv = flat.view(dtype).view(shape)
    return PeerPool(kv, stop=prefault_in_background(kv))


def _cuda() -> "_CudaIpc":
    global _CUDA
    if _CUDA is None:
        _CUDA = _CudaIpc()
    return _CUDA


_CUDA: "_CudaIpc | None" = None


class _Handle(ctypes.Structure):
    """CUipcMemHandle: 64 opaque bytes, passed by value to cuIpcOpenMemHandle."""

    _fields_ = [("reserved", ctypes.c_char * 64)]


class _CudaIpc:
    """The CUDA driver's IPC calls through ctypes (libcuda.so.1 comes with every driver)."""

    HANDLE_BYTES = 64
    LAZY_ENABLE_PEER_ACCESS = 1

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        u64 = ctypes.c_uint64
        self.lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(u64),
                                                     ctypes.POINTER(ctypes.c_size_t), u64]
        self.lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_Handle), u64]
        self.lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(u64), _Handle, ctypes.c_uint]
        self.lib.cuIpcCloseMemHandle.argtypes = [u64]

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(name))
            raise MapError(f"{what} failed: {(name.value or b'?').decode()} ({result})")

    def export(self, kv: torch.Tensor) -> tuple[bytes, int]:
        torch.cuda.synchronize(kv.device)  # makes the device's primary context current here
        ptr = ctypes.c_uint64(kv.data_ptr())
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._check(self.lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size),
                                                     ptr.value), "cuMemGetAddressRange")
        handle = _Handle()
        self._check(self.lib.cuIpcGetMemHandle(ctypes.byref(handle), base), "cuIpcGetMemHandle")
        return ctypes.string_at(ctypes.addressof(handle), self.HANDLE_BYTES), \
            kv.data_ptr() - base.value

    def map(self, desc: PoolExport, shape, dtype, device: torch.device) -> PeerPool:
        if len(desc.cuda_handle) != self.HANDLE_BYTES:
            raise MapError("malformed CUDA IPC handle")
        torch.cuda.synchronize(device)
        handle = _Handle.from_buffer_copy(desc.cuda_handle)
        base = ctypes.c_uint64()
        self._check(self.lib.cuIpcOpenMemHandle_v2(ctypes.byref(base), handle,
                                                   self.LAZY_ENABLE_PEER_ACCESS),
                    "cuIpcOpenMemHandle")
        ptr = base.value + desc.offset

        class _Array:  # just enough of the CUDA array interface for torch.as_tensor
            __cuda_array_interface__ = {"shape": (desc.nbytes,), "typestr": "|u1",
                                        "data": (ptr, False), "version": 3, "strides": None}

        flat = torch.as_tensor(_Array(), device=device)
        kv = flat.view(dtype).view(shape)
        lib, opened = self.lib, base.value

        def close() -> None:
            torch.cuda.synchronize(device)
            lib.cuIpcCloseMemHandle(opened)

        return PeerPool(kv, close)
