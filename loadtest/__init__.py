"""Locust scripts and the benchmark harness (see the performance issue)."""
