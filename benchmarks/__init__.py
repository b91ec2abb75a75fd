"""Benchmarks: what the profiler costs, how close its harness gets to the hardware, how it scales.

Run with `python -m benchmarks` (`--quick` for a short version, `--json PATH` to keep results).
Comparisons run A/B interleaved in one process (A B A B ...) and report medians and ratios,
so drift on a shared machine hits both sides alike.
"""
