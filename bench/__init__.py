"""Benchmarks of VoxVault against baselines run side by side: ``make bench``."""
