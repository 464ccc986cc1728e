"""The harness the suites stand on: servers started on free ports (`servers`), the load
generators (`loadgen`, on `rawhttp`), nginx as a balancer (`balancer`), an OTLP sink (`otlpsink`).
"""
