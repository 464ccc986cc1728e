"""The worker runtime: the process's event loop and recommender session (`worker_runtime`), and the
greenlet portal that runs Flask on that loop (`portal`).
"""
