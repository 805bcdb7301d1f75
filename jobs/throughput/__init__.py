"""The parts of jobs/bench_throughput.py, each readable on its own (the entry point runs them)."""
