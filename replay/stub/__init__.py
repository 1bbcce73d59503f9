"""The stub OpenAI server with a known schedule (for tests and benchmarks)."""
