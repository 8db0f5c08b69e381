"""Cluster launch helpers (a local single-node Slurm for tests)."""
