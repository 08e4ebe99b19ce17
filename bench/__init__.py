"""Benchmarks, one script per kernel (`python -m bench.bench_<op>`), and their shared plumbing."""
