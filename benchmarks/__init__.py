"""The benchmark harness: `python -m benchmarks` compares the fan-out strategies."""
