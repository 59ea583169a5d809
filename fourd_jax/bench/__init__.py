"""Side-by-side benchmarks against PyTorch on the same machine, recorded in docs/PERFORMANCE.md."""
