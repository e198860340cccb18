"""Planning: timings -> the assignment problem -> its exact solution -> a plan."""
