"""`pdmesh decode`: a decode instance (DP controller and its rank processes)."""

from pdmesh.worker.instance import instance_cli
from pdmesh.worker.config import DECODE


def configure_parser(parser):
    instance_cli.configure_parser(parser, DECODE)


def main(args) -> int:
    return instance_cli.run(args, DECODE)
