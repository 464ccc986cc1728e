"""Tests of `gateway.contract`: the OpenAPI document, API tokens."""
