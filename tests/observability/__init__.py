"""Tests of `gateway.observability`: request logs, metrics, tracing."""
