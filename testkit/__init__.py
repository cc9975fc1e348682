"""What tests and benchmarks share to drive real pdmesh processes: never imported by the services.

`proc` starts `pdmesh` processes the way the README does and waits for them; `faultkit` is a mesh
of real processes to break on purpose (kill, restart, drop links); `faultscenarios` are the faults
themselves, which tests assert on and `bench/faults.py` times. It lives beside the product, not in
it: the wheel ships `pdmesh` only. Tests import it through pytest's `pythonpath` (pyproject.toml),
the benchmarks because `python -m bench` runs from the repository root.
"""
