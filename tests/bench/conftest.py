"""Benchmarks are scripts run by `make bench`, not tests: keep pytest out of this folder."""

collect_ignore_glob = ["*.py"]
