"""Microbenchmarks of collab_ops against naive PyTorch, torch.compile and peer libraries.

Run them with `python -m collab_ops bench`; `bench.harness` holds the registry, the timing and the
run, `bench.report` writes the results, `bench.benchmarks` declares the cases.
"""
