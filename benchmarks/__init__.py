"""Benchmark tooling for the three DQN scripts (issue 5). Run the entry points from the repository root as modules,
e.g. `python -m benchmarks.measure sps`; benchmarks/README.md lists them."""
