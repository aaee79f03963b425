"""Ops-Core benchmarks: throughput and watch latency, each against an empty-RPC baseline.

Run with `make bench` (or `.venv/bin/python -m bench.run_all --quick`). These are not
tests: they print a table and write JSON under bench/results/.
"""
