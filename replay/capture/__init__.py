"""Capture (`replay record`): a proxy that writes live traffic as a trace."""
