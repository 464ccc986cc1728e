"""Tests of the entry points: `python -m gateway check-config`, the SDK."""
