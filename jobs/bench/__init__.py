"""Benchmarks: one module per `mcad bench` command, each printing ratios measured in one run."""
