"""Evaluation: benchmarks (LongBench, synthetic long-context tasks, ...) and their metrics, one submodule each."""
