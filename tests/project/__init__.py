"""Tests of the project itself: the import ranks, the documentation, the test tools."""
