"""The scale-out suite: two gateways behind nginx, one stopped mid-load
(``python -m benchmarks scaleout``).
"""
