"""The library's workflows: profile, verify, look up, warm up, manage the cache, report."""
