"""Capacity: SLOs, the capacity search, its statistics and watch."""
