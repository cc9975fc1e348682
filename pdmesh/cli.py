"""The `pdmesh` command: one subcommand per process kind.

Each subcommand lives in its service's package, in a module that exposes
`configure_parser(parser)` (flags, with `PDMESH_*` environment variables as defaults) and
`main(args) -> int` (builds the service's frozen config and runs it). Modules are imported only
when their subcommand is chosen, so `pdmesh bootstrap` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pdmesh import logs

SUBCOMMANDS = {
    "bootstrap": ("pdmesh.server.cli", "run the bootstrap service (prefill registry and room lookups)"),
    "prefill": ("pdmesh.worker.instance.prefill_cli", "run a prefill instance (DP controller and its ranks)"),
    "decode": ("pdmesh.worker.instance.decode_cli", "run a decode instance (DP controller and its ranks)"),
    "router": ("pdmesh.router.cli", "run the router in front of prefill and decode instances"),
    "up": ("pdmesh.router.up", "start a whole mesh on loopback, ask the model a demo question, keep serving"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logs.configure()  # PDMESH_LOG_LEVEL (default INFO), PDMESH_LOG_FORMAT=text|json
    parser = argparse.ArgumentParser(prog="pdmesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the chosen subcommand's module (bootstrap never loads torch)
            module = importlib.import_module(module_name)
            module.configure_parser(sub_parser)
    args = parser.parse_args(argv)
    assert module is not None
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
