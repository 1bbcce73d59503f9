"""One run: its config, plan, lifecycle, run directory files and side samplers."""
