"""Checks that need CUDA; skipped on machines without it."""
