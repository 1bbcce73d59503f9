"""The command line; nothing but replay/__main__.py and the `replay` script imports it."""
