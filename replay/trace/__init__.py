"""Traces: the internal TraceRecord, our JSONL, and loaders for public trace formats."""
