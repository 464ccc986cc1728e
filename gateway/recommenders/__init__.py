"""The recommenders' side of the wire: the HTTP clients (aiohttp, requests), the answers' bodies,
the one error table, and the model servers' readiness.
"""
