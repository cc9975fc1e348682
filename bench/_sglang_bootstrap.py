"""SGLang's bootstrap server, re-created for `bench bootstrap`: the peer measured in the same run.

SGLang's `CommonKVBootstrapServer` (sglang 0.5.x, `srt/disaggregation/common/conn.py`) is an aiohttp
application that runs on its own event loop in a thread of the prefill process. A prefill registers
each request's room with `POST /register_dp_rank` (JSON `{"bootstrap_room", "dp_rank"}`): the handler
parses the JSON, takes an `asyncio.Lock`, stores `{dp_rank, timestamp}` under the room and answers
the text "OK". A decode asks `POST /query_dp_ranks` (JSON `{"bootstrap_rooms": [...]}`) and gets a
JSON object room -> dp_rank for the rooms registered. SGLang itself cannot be imported here (its
package pulls in GPU-only dependencies), so this module serves the same two routes the same way,
written from that description; nothing is validated or bounded, as there.

The client side is generous to SGLang: one keep-alive aiohttp session (SGLang's prefill posts each
registration with `requests.post`, a new connection each time; its decode reuses a session).
Server: `python -m bench._sglang_bootstrap` prints its port and serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

from aiohttp import web


class SglangBootstrap:
    """The two room routes of SGLang's bootstrap server, on their own event loop in a thread."""

    def __init__(self) -> None:
        self.rooms: dict[int, dict] = {}
        self.lock = asyncio.Lock()
        self.app = web.Application()
        self.app.router.add_post("/register_dp_rank", self.register)
        self.app.router.add_post("/query_dp_ranks", self.query)
        self.port: int | None = None

    async def register(self, request: web.Request) -> web.Response:
        data = await request.json()
        room, dp_rank = int(data["bootstrap_room"]), int(data["dp_rank"])
        async with self.lock:
            self.rooms[room] = {"dp_rank": dp_rank, "timestamp": time.time()}
        return web.Response(text="OK", status=200)

    async def query(self, request: web.Request) -> web.Response:
        data = await request.json()
        result = {}
        async with self.lock:
            for room in data["bootstrap_rooms"]:
                entry = self.rooms.get(int(room))
                if entry is not None:
                    result[str(int(room))] = entry["dp_rank"]
        return web.json_response(result, status=200)

    def serve(self, ready: threading.Event) -> None:
        """Run the app on a new event loop (this thread's), as SGLang does."""
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self.app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, host="127.0.0.1", port=0)
        loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (SGLang's servers set uvloop's policy), as pdmesh's side runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def start() -> tuple[subprocess.Popen, str]:
    """Start the server in a subprocess; (process, "http://127.0.0.1:PORT")."""
    proc = subprocess.Popen([sys.executable, "-m", "bench._sglang_bootstrap"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        raise RuntimeError("the SGLang-style bootstrap server did not start")
    return proc, f"http://127.0.0.1:{port}"


class SglangClient:
    """A keep-alive aiohttp session posting SGLang's room requests."""

    def __init__(self, url: str) -> None:
        import aiohttp
        self._url = url
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))

    async def register(self, room: int, dp_rank: int) -> None:
        async with self._session.post(f"{self._url}/register_dp_rank",
                                      json={"bootstrap_room": room, "dp_rank": dp_rank}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"register_dp_rank answered {resp.status}")
            await resp.read()

    async def query(self, rooms: list[int]) -> dict:
        async with self._session.post(f"{self._url}/query_dp_ranks",
                                      json={"bootstrap_rooms": rooms}) as resp:
            return await resp.json()

    async def close(self) -> None:
        await self._session.close()


if __name__ == "__main__":
    server = SglangBootstrap()
    started = threading.Event()
    threading.Thread(target=server.serve, args=(started,), daemon=True).start()
    started.wait()
    print(server.port, flush=True)
    sys.stdin.read()
