"""Tests of `gateway.resilience`: retries, breakers, hedging, admission."""
