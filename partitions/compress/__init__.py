"""Compression before partitioning: sensitivity analysis, structured pruning, quantization, a report."""
