"""Benchmark scripts: each prints a table and writes JSON (and a PNG where a curve says more)."""
