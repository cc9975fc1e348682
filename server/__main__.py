"""`python -m pdmesh.server`: the same as `pdmesh bootstrap`."""

import sys

from pdmesh.cli import main

if __name__ == "__main__":
    sys.exit(main(["bootstrap", *sys.argv[1:]]))
