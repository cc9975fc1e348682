"""The `pdmesh` command: one subcommand per process kind.

Each subcommand lives in its service's package, in a module that exposes
`configure_parser(parser)` (flags, with `PDMESH_*` environment variables as defaults) and
`main(args) -> int` (builds the service's frozen config and runs it). Modules are imported only
when their subcommand is chosen, so `pdmesh bootstrap` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS = {
    "bootstrap": ("pdmesh.server.cli", "run the bootstrap service (prefill registry and room lookups)"),
    "prefill": ("pdmesh.worker.prefill_cli", "run a prefill instance (DP controller and its ranks)"),
    "decode": ("pdmesh.worker.decode_cli", "run a decode instance (DP controller and its ranks)"),
    "router": ("pdmesh.router.cli", "run the router in front of prefill and decode instances"),
    "up": ("pdmesh.router.up", "start a whole mesh on loopback, send a demo prompt, keep serving"),
}


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
            continue
        try:
            if importlib.util.find_spec(module) is not None:
                found[name] = (module, help_text)
        except ModuleNotFoundError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("PDMESH_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    parser = argparse.ArgumentParser(prog="pdmesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in _available().items():
        module = importlib.import_module(module_name)
        module.configure_parser(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    return int(modules[args.command].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
