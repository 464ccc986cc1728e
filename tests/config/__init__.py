"""Tests of `gateway.config`: the settings, their sources and their checks."""
