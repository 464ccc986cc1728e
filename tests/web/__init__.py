"""Tests of `gateway.web`: the endpoints over real HTTP in front of the mocks."""
