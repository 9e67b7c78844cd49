"""Peer kernels that the benchmarks build and load themselves where the peer's package cannot run."""
