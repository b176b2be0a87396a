"""roost's benchmarks, run from the repository root: ``python -m bench`` (distribution
on a testbed of network namespaces) and ``python -m bench.pack`` (packing speed)."""
