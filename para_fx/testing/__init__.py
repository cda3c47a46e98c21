"""Test fixtures: tiny models and pipelines, and ``run_ranks`` for N local CPU ranks."""
