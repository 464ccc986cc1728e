"""The speed suite: the fan-out strategies side by side (`run`, `report`: ``python -m benchmarks``),
what each HTTP client and protocol costs a call (`clients`), what each feature, tracing,
feedback and impressions cost, and goodput under overload.
"""
