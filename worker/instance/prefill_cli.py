"""`pdmesh prefill`: a prefill instance (DP controller, its rank processes, optional bootstrap)."""

from pdmesh.worker.instance import instance_cli
from pdmesh.worker.config import PREFILL


def configure_parser(parser):
    instance_cli.configure_parser(parser, PREFILL)


def main(args) -> int:
    return instance_cli.run(args, PREFILL)
