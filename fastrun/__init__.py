"""fastrun: measure every implementation of every heavy operator, keep the fastest, serve the plan."""
__version__ = "0.1.0"
