"""Run the benchmark parts and write their tables into README.md.

Each part is a module `bench.<name>` with `run(args) -> str` that measures its figures beside
its baseline and returns a Markdown fragment. The fragment replaces the text between
`<!-- bench:<name> -->` and `<!-- /bench:<name> -->` in README.md (so the README always shows what
`make bench` last measured) and is also saved under bench/results/. Plots go to docs/.

    python -m bench                 # every part that can run here
    python -m bench bootstrap pack  # only these parts
    python -m bench --list
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Order matters only for reading the output; parts that need hardware absent here skip themselves.
PARTS = ["bootstrap", "pack", "transfer", "ttft", "router", "http", "faults", "fresh", "model", "gpu"]


def write_readme_section(name: str, fragment: str) -> bool:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    stamp = time.strftime("%Y-%m-%d")
    body = f"{start}\n_Measured by `make bench` on {stamp}._\n\n{fragment.strip()}\n{end}"
    readme.write_text(pattern.sub(lambda _: body, text))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help=f"parts to run (default: all of {PARTS})")
    parser.add_argument("--list", action="store_true", help="list the parts and exit")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    args = parser.parse_args(argv)
    available = [p for p in PARTS if importlib.util.find_spec(f"bench.{p}") is not None]
    if args.list:
        print("\n".join(available))
        return 0
    chosen = args.parts or available
    unknown = [p for p in chosen if p not in available]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; available: {available}")
    os.environ.setdefault("PDMESH_TORCH_THREADS", "1")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        print(f"== bench {name}", file=sys.stderr, flush=True)
        fragment = importlib.import_module(f"bench.{name}").run(args)
        (results / f"{name}.md").write_text(fragment)
        print(fragment)
        if not args.no_readme and not write_readme_section(name, fragment):
            print(f"(README.md has no bench:{name} markers; fragment kept in bench/results)",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
