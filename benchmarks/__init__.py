"""Benchmarks and the tiny-model builder used by tests and first-run."""
