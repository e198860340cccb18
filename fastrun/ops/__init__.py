"""Operators: tensor formats, the implementation registry, the built-in implementations, light ops and reorders."""
