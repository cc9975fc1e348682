"""How fragmented rank pools get under a burst, and how much KV can then travel in place.

The shape of tests/faults/test_load.py (a burst of 1,000 requests over 2 ranks of each role, every
request held until its transfer is done), with prompts long enough to span many pages (64-2,048
tokens, 16-token pages, 32 layers x K,V) and decode growth (a page per 16 generated tokens,
16-256 new tokens). Each request's life on a rank, in an event order drawn at random per seed:
the prefill allocates the prompt's pages, the decode allocates its own (the transfer's
destination), the prefill frees once sent, the decode allocates a page at each page boundary as
it generates and frees everything when done; at most `in_flight` requests live at once per rank
pair, and a request whose pages are not free waits (as `alloc_wait` does).

Measured on the real `KvPool` (contiguous runs, best fit) beside the allocator pdmesh had before
(a LIFO free list: the last freed page is handed out first): per role, the share of requests
whose pages are one run, runs per request, the share of pages in runs of each length, and the
share of KV bytes that travel in place with the transfer defaults (a run both sides share of at
least `direct_min_bytes` per layer and K/V, at most `max_direct_runs` runs).

    python -m bench._fragmentation [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch

from pdmesh.worker.kv.layout import KvLayout
from pdmesh.worker.kv.pool import KvPool
from pdmesh.worker.transfer import runs
from pdmesh.worker.transfer.config import TransferConfig

LAYOUT = KvLayout(32, 16, 8, 128, torch.bfloat16)
TINY = KvLayout(1, 1, 1, 1, torch.float16)


class LifoPool:
    """The allocator pdmesh had before runs: a free list, last freed first out."""

    def __init__(self, num_pages: int) -> None:
        self.free_list = list(range(num_pages - 1, -1, -1))
        self.num_free = num_pages

    def alloc(self, n: int) -> list[int]:
        ids = [self.free_list.pop() for _ in range(n)]
        self.num_free -= n
        return ids

    def free(self, ids: list[int]) -> None:
        self.free_list.extend(reversed(ids))
        self.num_free += len(ids)


def _pool(kind: str, pages: int):
    # the allocator is what counts: a pool of a 1-element layout (no 8 GiB tensor here)
    return LifoPool(pages) if kind == "lifo" else KvPool(TINY, pages)


def burst(kind: str, requests: int, pages: int, in_flight: int, seed: int) -> dict:
    """One burst on one prefill rank and one decode rank; what the transfers looked like."""
    rng = random.Random(seed)
    pre, dec = _pool(kind, pages), _pool(kind, pages)
    todo = [(rng.randint(64, 2048), rng.randint(16, 256)) for _ in range(requests)]
    live: list[dict] = []
    seen = {"prefill": [], "decode": [], "in_place": []}
    config = TransferConfig()
    while todo or live:
        if todo and len(live) < in_flight and rng.random() < 0.5:
            prompt, new = todo[-1]
            n = LAYOUT.pages_for_tokens(prompt)
            if pre.num_free >= n and dec.num_free >= n:
                todo.pop()
                src, dst = pre.alloc(n), dec.alloc(n)
                seen["prefill"].append(runs.page_runs(src))
                seen["decode"].append(runs.page_runs(dst))
                plan = runs.WirePlan.build(LAYOUT, n, LAYOUT.num_layers, seen["decode"][-1],
                                           seen["prefill"][-1],
                                           min_direct_bytes=config.direct_min_bytes,
                                           max_direct_runs=config.max_direct_runs)
                seen["in_place"].append((plan.direct_pages, n))
                live.append({"src": src, "dst": dst, "tokens": prompt, "left": new})
                continue
        if not live:
            continue
        r = live[rng.randrange(len(live))]
        if r["src"]:  # the transfer finished: the prefill frees
            pre.free(r["src"])
            r["src"] = []
        elif r["left"] > 0:  # generate up to the next page boundary
            step = min(r["left"], LAYOUT.page_size - r["tokens"] % LAYOUT.page_size)
            r["tokens"] += step
            r["left"] -= step
            if r["tokens"] % LAYOUT.page_size == 0 and r["left"] > 0 and dec.num_free:
                r["dst"] += dec.alloc(1)
        else:
            dec.free(r["dst"])
            live.remove(r)
    return seen


def summary(seen: dict) -> dict:
    out = {}
    for role in ("prefill", "decode"):
        lists = seen[role]
        flat = [r for runs_ in lists for r in runs_]
        out[role] = {"one_run": sum(len(x) == 1 for x in lists) / len(lists),
                     "runs_per_request": statistics.mean(len(x) for x in lists),
                     "pages_in_runs": runs.run_histogram(flat)}
    moved = sum(d for d, _ in seen["in_place"]) / sum(n for _, n in seen["in_place"])
    out["in_place"] = moved
    return out


def run(quick: bool = False) -> dict:
    """{(allocator, pool pages): summary}: 2 ranks share the burst; 4,096 pages of this model
    are 8 GiB of KV, and 1,536 pages keep the pool nearly full (requests wait for pages)."""
    requests = 300 if quick else 1000
    return {(kind, pages): summary(burst(kind, requests // 2, pages, 64, seed=7))
            for pages in (4096, 1536) for kind in ("runs", "lifo")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    result = run(parser.parse_args().quick)
    print(json.dumps({f"{k} {p}": v for (k, p), v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
