"""Tests of what stands beside the gateway: the mocks, their world, the real model servers."""
