"""Tests of `gateway.runtime`: the worker's loop, and nothing blocking it."""
