"""Benchmark datasets that build offline from package registries."""
