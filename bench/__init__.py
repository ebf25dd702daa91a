"""Benchmarks: a data generator and a query harness (see docs/performance.md)."""
