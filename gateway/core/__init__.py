"""Core values and errors: the rank every other subpackage may import (docs/architecture.md).

What a fan-out comes to (`outcome`), the exception tree (`errors`), fusion, JSON within limits,
request ids and the recommenders' wire protocols: plain Python, no I/O, no framework.
"""
