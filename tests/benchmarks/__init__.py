"""Tests of `benchmarks/`: each suite end to end, and its parts."""
