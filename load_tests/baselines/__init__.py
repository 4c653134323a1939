"""Baselines for the load harness: the same work without Faust, and a naive Faust agent."""
