"""`pdmesh up`: a whole mesh on loopback in one command (what `make run` runs).

Starts a bootstrap service, a prefill instance (dp 2), a decode instance (dp 2) and a router as
separate processes on consecutive ports from `--base-port` (the router's OpenAI-compatible HTTP
API on base + 4 unless `--http-port` moves it or `--no-http` turns it off), waits until each answers its health
check, sends a demo request through the router, prints the answer, the rank path it took, the time
to first token, and whether the text equals what one colocated engine produces; then serves until
Ctrl-C (`--once` stops after the demo). Every process it started is stopped on the way out, also
when one of them fails to start, and the failing one is named with the tail of its log.

The model is `--model` (default `smollm2`, a real instruction-tuned model: the demo asks it
`--question` through its chat template) or, with `--model-preset`, random weights (the demo then
sends the raw `--prompt`). The model is resolved and checked before any process starts (the first
start converts a named model into the cache), so a bad model fails here, with one message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh import grpcutil, tls
from pdmesh.config import env
from pdmesh.errors import PdmeshError
from pdmesh.models import DEFAULT_MODEL
from pdmesh.reasons import Reason

DEMO_PROMPT = "The prefill computes the prompt's KV cache; the decode"  # raw prompt of random models
DEMO_QUESTION = "What is the capital of France?"  # asked through a real model's chat template
START_TIMEOUT_S = 180.0


@dataclass
class Child:
    name: str
    address: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=env("UP_HOST", "127.0.0.1"), help="address every process binds")
    p.add_argument("--base-port", type=int, default=int(env("UP_BASE_PORT", "8998")),
                   help="bootstrap on this port, router +1, prefill +2, decode +3, HTTP API +4")
    http = env("HTTP_PORT", "")
    p.add_argument("--http-port", type=int, default=int(http) if http.strip() else None,
                   help="the router's OpenAI-compatible HTTP API port (env PDMESH_HTTP_PORT; "
                        "default: base port + 4)")
    p.add_argument("--no-http", action="store_true", help="no HTTP API, gRPC only")
    p.add_argument("--dp-size", type=int, default=2, help="DP ranks of the prefill and of the decode")
    p.add_argument("--prefill-method", default="follow_bootstrap_room",
                   choices=["round_robin", "shortest_queue", "follow_bootstrap_room"])
    p.add_argument("--model", default=env("MODEL"),
                   help=f"a model name, Hugging Face folder or .gguf file (default {DEFAULT_MODEL}) "
                        "[PDMESH_MODEL]")
    p.add_argument("--model-preset", default=env("MODEL_PRESET"),
                   help="random weights of this preset instead of a model (tiny: exact tests, "
                        "bench-kv: benchmarks) [PDMESH_MODEL_PRESET]")
    p.add_argument("--cache-dir", default=env("CACHE_DIR"),
                   help="where named models are converted once and cached [PDMESH_CACHE_DIR] "
                        "(default ~/.cache/pdmesh)")
    p.add_argument("--question", default=DEMO_QUESTION, help="the demo question (models with a chat template)")
    p.add_argument("--prompt", default=None,
                   help=f"a raw demo prompt instead of the question (default for presets: {DEMO_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64 for a question, 24 for a prompt")
    p.add_argument("--kv-transfer-path", choices=("auto", "ucx"),
                   default=env("KV_TRANSFER_PATH", "auto"),
                   help="auto: a prefill writes KV straight into a decode's pool on the same host; "
                        "ucx: always over UCX [PDMESH_KV_TRANSFER_PATH]")
    p.add_argument("--once", action="store_true", help="stop after the demo")
    p.add_argument("--log-dir", default=None, help="where each process's log goes (default: a temp dir)")
    tls.add_arguments(p)  # passed on to every process; the health checks and the demo use it too


def engine_spec(args: argparse.Namespace):
    """The EngineSpec every process of the mesh gets: `--model-preset` means random weights,
    else `--model` (default smollm2). Both at once is a mistake, refused."""
    from pdmesh.worker.engine.factory import EngineSpec

    if args.model and args.model_preset:
        raise ValueError("give --model or --model-preset, not both")
    if args.model_preset:
        return EngineSpec(preset=args.model_preset, cache_dir=args.cache_dir)
    return EngineSpec(model=args.model or DEFAULT_MODEL, cache_dir=args.cache_dir)


def plan(args: argparse.Namespace, log_dir: Path) -> list[Child]:
    host, base = args.host, args.base_port
    addr = {k: f"{host}:{base + i}" for i, k in enumerate(["bootstrap", "router", "prefill", "decode"])}
    exe = [sys.executable, "-m", "pdmesh.cli"]
    spec = engine_spec(args)
    engine = ["--model", spec.model] if spec.model else ["--model-preset", spec.preset]
    engine += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    secure = tls.to_argv(tls.from_args(args))
    children = [
        Child("bootstrap", addr["bootstrap"], [*exe, "bootstrap", "--host", host, "--port", str(base)],
              log_dir / "bootstrap.log"),
        Child("prefill", addr["prefill"],
              [*exe, "prefill", "--host", host, "--port", str(base + 2), "--dp-size", str(args.dp_size),
               "--load-balance-method", args.prefill_method, "--bootstrap-addr", addr["bootstrap"],
               "--instance-id", "prefill-0", "--kv-transfer-path", args.kv_transfer_path, *engine],
              log_dir / "prefill.log"),
        Child("decode", addr["decode"],
              [*exe, "decode", "--host", host, "--port", str(base + 3), "--dp-size", str(args.dp_size),
               "--instance-id", "decode-0", "--kv-transfer-path", args.kv_transfer_path,
               "--bootstrap-addr", addr["bootstrap"], *engine],  # pre-links to the prefill's ranks
              log_dir / "decode.log"),
        Child("router", addr["router"],
              [*exe, "router", "--host", host, "--port", str(base + 1), "--prefill", addr["prefill"],
               "--decode", addr["decode"], *http_argv(args)], log_dir / "router.log"),
    ]
    for child in children:
        child.argv += secure
    return children


def http_port(args: argparse.Namespace) -> int | None:
    """The HTTP API's port, or None with --no-http."""
    if args.no_http:
        return None
    return args.base_port + 4 if args.http_port is None else args.http_port


def served_model_name(args: argparse.Namespace) -> str:
    """What the HTTP API calls the model: its name (`smollm2`), folder or file name, or the preset."""
    spec = engine_spec(args)
    return Path(spec.model).name if spec.model else spec.preset


def http_argv(args: argparse.Namespace) -> list[str]:
    port = http_port(args)
    if port is None:
        return []
    argv = ["--http-port", str(port), "--served-model-name", served_model_name(args)]
    spec = engine_spec(args)
    if spec.model:  # the model's folder (a named model's cache) carries its chat template
        from pdmesh.models import resolve_model
        argv += ["--chat-template", str(resolve_model(spec.model, args.cache_dir))]
    return argv


def http_url(args: argparse.Namespace) -> str | None:
    port = http_port(args)
    if port is None:
        return None
    secure = tls.from_args(args)
    return f"{'https' if secure and secure.has_identity else 'http'}://{args.host}:{port}/v1"


async def wait_healthy(child: Child, deadline: float, tls_config: tls.TlsConfig | None = None) -> None:
    """Poll the child's health service until SERVING; fail at once if the process exits."""
    async with grpcutil.open_channel(child.address, tls=tls_config) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}")
            try:
                reply = await grpcutil.call(stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except PdmeshError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} did not become healthy within {START_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.2)


def stop_all(children: list[Child]) -> None:
    for child in reversed(children):
        if child.proc and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in reversed(children):
        if child.proc:
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


async def start_all(children: list[Child], tls_config: tls.TlsConfig | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    env_vars = dict(os.environ, PYTHONUNBUFFERED="1")
    for child in children:
        log = open(child.log_path, "w")
        child.proc = subprocess.Popen(child.argv, stdout=log, stderr=subprocess.STDOUT, env=env_vars,
                                      start_new_session=True)
        log.close()
        try:
            await wait_healthy(child, deadline, tls_config)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- last lines of {child.log_path} ---\n{child.log_tail()}") from None
        print(f"  {child.name:<9} {child.address}  (pid {child.proc.pid}, log {child.log_path})", flush=True)


def demo_prompt(args: argparse.Namespace) -> tuple[str, int, str]:
    """(the prompt text sent, max new tokens, the lines that show what was asked)."""
    spec = engine_spec(args)
    if args.prompt is None and spec.model:
        from pdmesh.chat import apply_chat_template
        from pdmesh.errors import InvalidArgument

        try:
            text = apply_chat_template([{"role": "user", "content": args.question}], model=spec.model,
                                       cache_dir=spec.cache_dir)
            return text, args.max_new_tokens or 64, f"question: {args.question!r} ({spec.model}'s chat template)"
        except InvalidArgument as exc:
            if exc.reason != Reason.NO_CHAT_TEMPLATE:
                raise
    prompt = args.prompt or DEMO_PROMPT
    return prompt, args.max_new_tokens or 24, f"prompt : {prompt!r}"


async def demo(args: argparse.Namespace, router_address: str) -> bool:
    from pdmesh.router.client import RouterClient

    prompt, max_new, shown = demo_prompt(args)
    async with RouterClient(router_address, tls=tls.from_args(args)) as client:
        result = await client.generate(prompt, max_new_tokens=max_new)
    spec = engine_spec(args)
    reference = colocated_text(prompt, max_new, model=spec.model, preset=spec.preset, cache_dir=spec.cache_dir)
    same = result.text == reference
    info = result.info
    label = "answer  :" if shown.startswith("question") else "text   :"
    finish = result.finish_reason.removeprefix("FINISH_REASON_").lower()
    print(f"\n{shown}\n{label} {result.text!r}\ntokens : {len(result.token_ids)} ({finish})")
    print(f"path   : prefill {info.prefill_instance} rank {info.routing.prefill_dp_rank} -> "
          f"decode {info.decode_instance} rank {info.routing.decode_dp_rank} "
          f"({result.rank_path}, room {info.bootstrap_room})")
    print(f"TTFT   : {info.ttft_ms:.1f} ms")
    print(f"same text as one colocated engine: {'yes' if same else 'NO'}")
    return same


def colocated_text(prompt: str, max_new_tokens: int, *, model: str | None, preset: str,
                   cache_dir: str | None = None) -> str:
    """What one engine, prefill and decode in the same process, generates for `prompt`."""
    from pdmesh.worker.engine.factory import EngineSpec, build_engine
    from pdmesh.worker.engine.reference import colocated_generate
    from pdmesh.worker.engine.runtime import configure_torch_threads

    configure_torch_threads()
    engine = build_engine(EngineSpec(model=model, preset=preset, cache_dir=cache_dir))
    generation = colocated_generate(engine, engine.tokenizer.encode(prompt), max_new_tokens)
    return engine.tokenizer.decode(generation.output_ids)


async def run(args: argparse.Namespace) -> int:
    from pdmesh.worker.engine.factory import check_model

    try:  # before any process starts: a bad model is one message, not a half-started mesh
        print(f"pdmesh up: model {check_model(engine_spec(args))}", flush=True)
    except PdmeshError as exc:
        print(f"pdmesh up: {exc.reason}: {exc.message}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdmesh-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children = plan(args, log_dir)
    print(f"pdmesh up: starting the mesh (logs in {log_dir})", flush=True)
    try:
        await start_all(children, tls.from_args(args))
        url = http_url(args)
        if url:
            print(f"  http      {url}  (OpenAI-compatible API, model {served_model_name(args)!r})", flush=True)
        ok = await demo(args, children[-1].address)
        if args.once:
            return 0 if ok else 1
        print(f"\nserving; router at {children[-1].address}"
              f"{f', HTTP API at {url}' if url else ''}. Ctrl-C stops every process.", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watchers = [asyncio.create_task(asyncio.to_thread(c.proc.wait)) for c in children]
        done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *watchers],
                                     return_when=asyncio.FIRST_COMPLETED)
        for child in children:
            if child.proc.poll() is not None:
                print(f"{child.name} exited with code {child.proc.returncode}; stopping the mesh\n"
                      f"{child.log_tail()}", file=sys.stderr)
                return 1
        return 0
    except RuntimeError as exc:
        print(f"pdmesh up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(children)
        print("pdmesh up: every process stopped", flush=True)


def main(args: argparse.Namespace) -> int:
    try:
        tls.from_args(args)
        engine_spec(args)
    except ValueError as exc:  # inconsistent TLS or model flags
        print(f"pdmesh up: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run(args))
