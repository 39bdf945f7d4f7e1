"""Serving benchmark: load generator, baseline servers, and the CLI that compares them (`python -m bench.serving`)."""
