"""Tests of `gateway.feedback`: impressions, events, stores, attribution, the learner."""
