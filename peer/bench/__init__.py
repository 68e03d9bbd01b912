"""Benchmarks that measure their baseline in the same run."""
