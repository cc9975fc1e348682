"""Which UCX settings make a CUDA tag send as fast as `ucx_perftest -m cuda` (H100, two processes).

Each variant runs the bare ucxx send of one CUDA buffer (bench/gpu_ucx.py `bare`, its own pair of
processes) and `ucx_perftest -t tag_bw -m cuda` under the same environment, at 64 MiB and 1 GiB:

    python -m bench._gpu_settings [--quick] [--second | --ucxx-env | --progress] [--out DIR]

Variants: pdmesh's host settings (protocol v1), UCX's protocol v2 (the 1.21 default), v2 with
each rendezvous scheme, v2 without ucxx's peer-error handling (ucx_perftest has none; ucxx's
async API then failed its first message here), and UCX_PROTO_INFO logs of the protocol UCX
picked; `--second`: the bare send in each progress mode, and KvSender/KvReceiver pool to pool
with pages in place (one run) or packed (scattered). What it found is in the README ("CUDA memory
over UCX"); the engine variants name settings of the time they were measured (hot polling of
CUDA requests was tried and dropped: no gain). `--progress` (2026-12-07, after a busy-polled
probe reached ucx_perftest's rate with ucxx's own tag send, `bench/_gpu_rma_probe.py`): pdmesh's
UCX engine alone on one CUDA buffer, and pool to pool over UCX, in each PDMESH_UCX_HOT_POLL mode.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench import gpu_ucx

BASE = {"UCX_TLS": "cuda_copy,cuda_ipc,tcp,sm,self", "UCX_MM_ERROR_HANDLING": "y",
        "UCX_WARN_UNUSED_ENV_VARS": "n"}
VARIANTS: dict[str, dict[str, str]] = {
    "pdmesh (v1)": {"UCX_PROTO_ENABLE": "n"},
    "v2": {"UCX_PROTO_ENABLE": "y"},
    "v1, no peer-error handling": {"UCX_PROTO_ENABLE": "n", "PDMESH_BENCH_UCX_ERRH": "0"},
    "v2, no peer-error handling": {"UCX_PROTO_ENABLE": "y", "PDMESH_BENCH_UCX_ERRH": "0"},
    "v2, rndv get_zcopy": {"UCX_PROTO_ENABLE": "y", "UCX_RNDV_SCHEME": "get_zcopy"},
    "v2, rndv put_zcopy": {"UCX_PROTO_ENABLE": "y", "UCX_RNDV_SCHEME": "put_zcopy"},
}
PERFTEST_VARIANTS = ("pdmesh (v1)", "v2")


def _with(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return saved


def _restore(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run(sizes: list[int], iters: int, out: Path | None) -> list[dict]:
    rows = []
    for name, extra in VARIANTS.items():
        env = dict(BASE, **extra)
        if out is not None and name == "v2":
            env["UCX_PROTO_INFO"] = "y"
        saved = _with(env)
        try:
            log = out / f"bare-{len(rows)}.log" if out is not None else None
            try:
                bare = gpu_ucx._pair("bare", sizes, iters, log=log)
                for r in bare:
                    rows.append({"variant": name, "what": "bare ucxx", "bytes": r["bytes"],
                                 "gbps": round(r["gbps"], 1)})
            except Exception as err:  # noqa: BLE001 - a variant UCX refuses is a finding too
                rows.append({"variant": name, "what": "bare ucxx", "error": str(err)[-300:]})
            for size in sizes if name in PERFTEST_VARIANTS else ():
                try:
                    p = gpu_ucx.perftest(size, max(iters, 20))
                    rows.append({"variant": name, "what": "perftest", "bytes": size,
                                 "gbps": round(p["gbps"], 1)})
                except Exception as err:  # noqa: BLE001
                    rows.append({"variant": name, "what": "perftest", "error": str(err)[-300:]})
            print(json.dumps([r for r in rows if r["variant"] == name]), flush=True)
        finally:
            _restore(saved)
    return rows


ENGINE_VARIANTS = {
    "v1, hot poll": ("one-run", {"UCX_PROTO_ENABLE": "n"}),
    "v1, no hot poll": ("one-run", {"UCX_PROTO_ENABLE": "n", "PDMESH_UCX_HOT_POLL": "0"}),
    "v1, hot poll, scattered": ("scattered", {"UCX_PROTO_ENABLE": "n"}),
    "v2, hot poll": ("one-run", {"UCX_PROTO_ENABLE": "y"}),
}


def engine(iters: int) -> list[dict]:
    """KvSender/KvReceiver pool to pool (1 GiB, 64 MiB) under each ENGINE_VARIANTS setting."""
    from bench import gpu_engine
    rows = []
    for name, (pages, extra) in ENGINE_VARIANTS.items():
        try:
            got = gpu_engine.run([8192, 512], iters, pages=pages, timeout=120,
                                 extra_env=dict(BASE, **extra))
            rows += [{"variant": f"engine {name}", "pages": pages, "bytes": r["bytes"],
                      "gbps": round(r["gbps"], 1)} for r in got]
        except Exception as err:  # noqa: BLE001
            rows.append({"variant": f"engine {name}", "pages": pages, "error": str(err)[-600:]})
        print(json.dumps(rows[-2:]), flush=True)
    return rows


def bare(iters: int) -> list[dict]:
    """The bare send (1 GiB first, then 64 MiB) in each ucxx progress mode."""
    rows = []
    for proto, mode in (("n", "blocking"), ("n", "polling"), ("y", "polling")):
        saved = _with(dict(BASE, UCX_PROTO_ENABLE=proto))
        try:
            got = gpu_ucx._pair("bare", [1 << 30, 64 << 20], iters, mode=mode)
            rows += [{"variant": f"bare proto_enable={proto} {mode}", "bytes": r["bytes"],
                      "gbps": round(r["gbps"], 1)} for r in got]
        except Exception as err:  # noqa: BLE001
            rows.append({"variant": f"bare proto_enable={proto} {mode}", "error": str(err)[-600:]})
        finally:
            _restore(saved)
        print(json.dumps(rows[-2:]), flush=True)
    return rows


# What ucxx's __init__ sets in the environment when UCX does not have it (ucx_perftest never sees
# these), each put back to UCX's own default in turn; perftest is run under ucxx's settings too.
UCXX_SETS = {"UCX_MAX_RNDV_RAILS": "1", "UCX_RNDV_FRAG_MEM_TYPE": "cuda",
             "UCX_CUDA_COPY_MAX_REG_RATIO": "1.0", "UCX_RNDV_THRESH": "8192",
             "UCX_MEMTYPE_CACHE": "n"}
UCX_DEFAULTS = {"UCX_MAX_RNDV_RAILS": "2", "UCX_RNDV_FRAG_MEM_TYPE": "host",
                "UCX_CUDA_COPY_MAX_REG_RATIO": "0.1", "UCX_RNDV_THRESH": "auto",
                "UCX_MEMTYPE_CACHE": "y"}


def ucxx_env(iters: int) -> list[dict]:
    """The bare send under ucxx's own environment, then with each of its settings put back."""
    sizes = [1 << 30, 64 << 20]
    variants = {"ucxx's settings": {}, "UCX defaults for all five": dict(UCX_DEFAULTS)}
    variants.update({f"{k}={v}": {k: v} for k, v in UCX_DEFAULTS.items()})
    rows = []
    for name, extra in variants.items():
        saved = _with(dict(BASE, UCX_PROTO_ENABLE="y", **extra))
        try:
            got = gpu_ucx._pair("bare", sizes, iters, mode="polling")
            rows += [{"variant": f"bare, {name}", "bytes": r["bytes"], "gbps": round(r["gbps"], 1)}
                     for r in got]
        except Exception as err:  # noqa: BLE001
            rows.append({"variant": f"bare, {name}", "error": str(err)[-600:]})
        finally:
            _restore(saved)
        print(json.dumps(rows[-2:]), flush=True)
    for name, extra in (("perftest, UCX defaults", {}), ("perftest, ucxx's settings", UCXX_SETS)):
        saved = _with(dict(BASE, UCX_PROTO_ENABLE="y", **extra))
        try:
            for size in sizes:
                p = gpu_ucx.perftest(size, 50)
                rows.append({"variant": name, "bytes": size, "gbps": round(p["gbps"], 1)})
        except Exception as err:  # noqa: BLE001
            rows.append({"variant": name, "error": str(err)[-600:]})
        finally:
            _restore(saved)
        print(json.dumps(rows[-2:]), flush=True)
    return rows


def _engine_bare(sizes: list[int], iters: int, env: dict[str, str], device: str = "cuda"
                 ) -> list[dict]:
    """pdmesh's own UCX engine and link sending one CUDA buffer (bench._transfer_bare, engine
    mode, no pack or transfer protocol); the receiver's GB/s per size."""
    import subprocess
    import sys

    full = dict(os.environ, **env)
    args = ["--mode", "engine", "--device", device, "--sizes", ",".join(map(str, sizes)),
            "--iters", str(iters)]
    recv = subprocess.Popen([sys.executable, "-m", "bench._transfer_bare", "recv", *args],
                            env=full, stdout=subprocess.PIPE, text=True)
    try:
        port = None
        for line in recv.stdout:
            if line.startswith("{"):
                port = json.loads(line)["port"]
                break
        subprocess.run([sys.executable, "-m", "bench._transfer_bare", "send", "--port", str(port),
                        *args], env=full, check=True, timeout=300, capture_output=True)
        rest, _ = recv.communicate(timeout=60)
        return [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    finally:
        if recv.poll() is None:
            recv.kill()


def progress_modes(iters: int) -> list[dict]:
    """Per PDMESH_UCX_HOT_POLL mode (off, all, cuda): pdmesh's engine sending one CUDA buffer,
    and KvSender/KvReceiver pool to pool over UCX (16-token pages, same-host mapping off)."""
    from bench import gpu_samehost
    rows = []
    for mode in ("off", "all", "cuda"):
        env = {"PDMESH_UCX_HOT_POLL": mode}
        try:
            for r in _engine_bare([64 << 20, 1 << 30], iters, env):
                rows.append({"variant": f"engine bare, hot poll {mode}", "bytes": r["size"],
                             "gbps": round(r["gbps"], 1)})
        except Exception as err:  # noqa: BLE001 - a failing mode is a finding too
            rows.append({"variant": f"engine bare, hot poll {mode}", "error": str(err)[-300:]})
        saved = _with(env)
        try:
            got = gpu_samehost.pair_goodput("ucx", [512, 8192], [16], max(2, iters // 5))
            rows += [{"variant": f"pool to pool over UCX, hot poll {mode}", "tokens": tok,
                      "in_flight": inflight, "gbps": round(v[0], 1)}
                     for (_, tok, inflight), v in got.items()]
        except Exception as err:  # noqa: BLE001
            rows.append({"variant": f"pool to pool over UCX, hot poll {mode}", "error": str(err)[-300:]})
        finally:
            _restore(saved)
        print(json.dumps([r for r in rows if mode in r["variant"]]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--second", action="store_true", help="progress modes, engine windows")
    parser.add_argument("--ucxx-env", action="store_true", help="ucxx's own UCX settings")
    parser.add_argument("--progress", action="store_true",
                        help="pdmesh's engine and UCX path per PDMESH_UCX_HOT_POLL mode")
    args = parser.parse_args()
    sizes = [64 << 20, 1 << 30]
    if args.progress:
        rows = progress_modes(20)
    elif args.ucxx_env:
        rows = ucxx_env(20)
    elif args.second:
        rows = bare(20) + engine(5)
    else:
        rows = run(sizes, 5 if args.quick else 20, args.out) + engine(3 if args.quick else 10)
    if args.out is not None:
        (args.out / "settings.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
