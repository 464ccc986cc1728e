"""The soak suite: the gateway with feedback on under steady load for half an hour, its
workers' memory and the feedback store sampled as it runs (``python -m benchmarks soak``).
"""
