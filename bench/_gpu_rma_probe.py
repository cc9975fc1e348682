"""Probe: one CUDA buffer between two processes on one GPU, ucxx tag send beside a UCX RMA put.

Both driven the same way (UCX worker progressed in a busy loop, no asyncio), so the difference is
the UCX operation alone: ucxx's tag send (what KvSender uses) against `ucp_put_nbx` into memory
the receiver mapped with `ucp_mem_map` (what NIXL's WRITE does), called through ctypes on the
same UCX worker and endpoint. Prints one JSON line per size from the sender.

    python -m bench._gpu_rma_probe recv PORT MiB [MiB ..] &   python -m bench._gpu_rma_probe send PORT MiB ..
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import time

ITERS = 20
_VP, _SZ = ctypes.c_void_p, ctypes.c_size_t
_ERR_LAST = 2**64 - 256  # a status pointer at or above this is an error code


class _MapParams(ctypes.Structure):
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", _VP), ("length", _SZ),
                ("flags", ctypes.c_uint), ("prot", ctypes.c_uint), ("memory_type", ctypes.c_int),
                ("exported", _VP)]


def _ucp():
    import libucx
    lib = ctypes.CDLL(os.path.join(os.path.dirname(libucx.__file__), "lib", "libucp.so"),
                      mode=ctypes.RTLD_GLOBAL)
    lib.ucp_mem_map.argtypes = [_VP, _VP, ctypes.POINTER(_VP)]
    lib.ucp_rkey_pack.argtypes = [_VP, _VP, ctypes.POINTER(_VP), ctypes.POINTER(_SZ)]
    lib.ucp_ep_rkey_unpack.argtypes = [_VP, _VP, ctypes.POINTER(_VP)]
    lib.ucp_put_nbx.argtypes = [_VP, _VP, _SZ, ctypes.c_uint64, _VP, _VP]
    lib.ucp_put_nbx.restype = _SZ
    lib.ucp_ep_flush_nbx.argtypes = [_VP, _VP]
    lib.ucp_ep_flush_nbx.restype = _SZ
    lib.ucp_request_check_status.argtypes = [_VP]
    lib.ucp_request_free.argtypes = [_VP]
    return lib


def _view(t):
    return t if t.is_cuda else t.numpy()


def main() -> None:
    role, port, sizes = sys.argv[1], int(sys.argv[2]), [int(x) << 20 for x in sys.argv[3:]]
    from bench.gpu_ucx import UCX_ENV
    for k, v in UCX_ENV.items():
        os.environ.setdefault(k, v)
    import numpy as np
    import torch
    import ucxx._lib.libucxx as api
    from ucxx._lib.arr import Array
    from ucxx.types import Tag, TagMaskFull

    ucp = _ucp()
    ctx = api.UCXContext({})
    worker = api.UCXWorker(ctx)
    param = ctypes.create_string_buffer(256)

    def wait(req):
        while not req.completed:
            worker.progress()
        req.check_error()

    def wait_ptr(p):
        if p >= _ERR_LAST:
            raise RuntimeError(f"UCX error {p - 2**64}")
        if p == 0:
            return
        while (st := ucp.ucp_request_check_status(p)) == 1:
            worker.progress()
        ucp.ucp_request_free(p)
        if st != 0:
            raise RuntimeError(f"UCX status {st}")

    big = max(sizes)
    dev = os.environ.get("PROBE_DEVICE", "cuda")  # cpu: to try the script where no GPU is
    if role == "recv":
        buf = torch.zeros(big, dtype=torch.uint8, device=dev)
        mp = _MapParams(1 | 2 | 16, buf.data_ptr(), big, 0, 0, int(dev == "cuda"), None)
        memh = _VP()
        assert ucp.ucp_mem_map(ctx.handle, ctypes.byref(mp), ctypes.byref(memh)) == 0
        rb, rs = _VP(), _SZ()
        assert ucp.ucp_rkey_pack(ctx.handle, memh, ctypes.byref(rb), ctypes.byref(rs)) == 0
        rkey = ctypes.string_at(rb, rs.value)
        eps = []
        listener = api.UCXListener.create(
            worker, port, lambda cr: eps.append(listener.create_endpoint_from_conn_request(cr, True)))
        print("READY", flush=True)
        while not eps:
            worker.progress()
        ep = eps[0]
        msg = np.frombuffer(struct.pack("<QQ", buf.data_ptr(), len(rkey)) + rkey, np.uint8).copy()
        wait(ep.stream_send(Array(np.frombuffer(struct.pack("<Q", len(msg)), np.uint8).copy())))
        wait(ep.stream_send(Array(msg)))
        for size in sizes:
            for it in range(ITERS + 3):
                wait(ep.tag_recv(Array(_view(buf[:size])), Tag(it), TagMaskFull))
            done = np.zeros(1, np.uint8)
            wait(ep.stream_recv(Array(done)))  # the sender's puts of this size ended
            ok = bool(torch.equal(buf[:size][-4096:], (torch.arange(size, device=dev)[-4096:] % 251).to(torch.uint8)))
            print("RESULT", "ok" if ok else "bad", size, flush=True)
        return
    src = (torch.arange(big, device=dev) % 251).to(torch.uint8)
    if dev == "cuda":
        torch.cuda.synchronize()
    ep = api.UCXEndpoint.create(worker, "127.0.0.1", port, True)
    hdr = np.zeros(8, np.uint8)
    wait(ep.stream_recv(Array(hdr)))
    msg = np.zeros(struct.unpack("<Q", hdr.tobytes())[0], np.uint8)
    wait(ep.stream_recv(Array(msg)))
    addr, _ = struct.unpack("<QQ", msg[:16].tobytes())
    rkey = _VP()
    assert ucp.ucp_ep_rkey_unpack(ep.handle, msg[16:].tobytes(), ctypes.byref(rkey)) == 0
    for size in sizes:
        tag_t, put_t = [], []
        for it in range(ITERS + 3):
            t = time.perf_counter()
            wait(ep.tag_send(Array(_view(src[:size])), Tag(it)))
            tag_t.append(time.perf_counter() - t)
        for it in range(ITERS + 3):
            t = time.perf_counter()
            p = ucp.ucp_put_nbx(ep.handle, src.data_ptr(), size, addr, rkey, param)
            if p >= _ERR_LAST:
                raise RuntimeError(f"put: UCX error {p - 2**64}")
            if p:
                ucp.ucp_request_free(p)
            wait_ptr(ucp.ucp_ep_flush_nbx(ep.handle, param))
            put_t.append(time.perf_counter() - t)
        wait(ep.stream_send(Array(np.ones(1, np.uint8))))
        med = lambda xs: sorted(xs[3:])[len(xs[3:]) // 2]  # noqa: E731
        print(json.dumps({"bytes": size, "tag_gbps": round(size / med(tag_t) / 1e9, 1),
                          "put_gbps": round(size / med(put_t) / 1e9, 1),
                          "tag_ms": round(med(tag_t) * 1e3, 3), "put_ms": round(med(put_t) * 1e3, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
