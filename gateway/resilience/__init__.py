"""Resilience and admission: retries, breakers, hedging, and the worker's admission (loop lag,
adaptive limit, queue).
"""
