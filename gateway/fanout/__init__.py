"""The fan-out: one recommender's guarded call (`call`) and the strategies that run them all
(`strategies`: async, threads, sequential).
"""
