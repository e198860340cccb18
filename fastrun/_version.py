"""Version constants, importable without importing the package (a leaf: nothing here imports fastrun)."""
__version__ = "0.1.0"

# Version of the JSON stored in the cache (timings, plans); a value of another schema is ignored.
SCHEMA = 1
