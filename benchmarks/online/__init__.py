"""The online suite: simulated users click, and the gateway learns from them
(``python -m benchmarks online``).
"""
