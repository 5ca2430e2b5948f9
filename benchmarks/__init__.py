"""`make bench` and the per-stage benchmarks (import name: `groundmill.benchmarks`)."""
