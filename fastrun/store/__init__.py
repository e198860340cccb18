"""Persistence: JSON-only stores of timings and plans, their keys, compiled programs on disk."""
