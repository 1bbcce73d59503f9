"""Schedules: arrival models, prompt shapes, and Requests built from arrivals or traces."""
