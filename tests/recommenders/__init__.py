"""Tests of `gateway.recommenders`: the HTTP clients and the error table."""
