"""Measuring: candidates checked and timed in a killable worker, light ops and reorders timed."""
