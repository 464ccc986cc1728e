"""The quality suite: each recommender and each fusion scored against the held-out truth
(``python -m benchmarks quality``).
"""
