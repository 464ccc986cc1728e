"""Observability: request logs, Prometheus metrics, tracing (no-op spans, OpenTelemetry)."""
