"""Throughput and memory benchmarks (`sftscale bench`) and the data-preparation benchmark."""
