"""`make bench`: the benchmarks of pdmesh, each measured beside a baseline run by the same script."""
