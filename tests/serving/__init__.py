"""Tests of `gateway.serving`: the ASGI app and the HTTP edge."""
