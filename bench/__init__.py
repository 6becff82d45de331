"""Benchmarks for ilink-fixproxy: ``python -m bench [--quick]`` (see run.py, docs/performance.md)."""
