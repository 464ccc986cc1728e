"""Tests of `gateway.core`: fusion, JSON limits, request ids, the wire protocols."""
