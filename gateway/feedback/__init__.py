"""Feedback: impressions, events, their stores (SQLite, Redis), attribution and the learner.

Each module is imported where it is used: importing the package loads none of them.
"""
