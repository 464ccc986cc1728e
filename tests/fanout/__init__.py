"""Tests of `gateway.fanout`: one guarded call, and the strategies."""
