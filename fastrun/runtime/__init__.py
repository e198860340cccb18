"""Running a plan: plan data, recipes (a compiled plan as data), programs (sessions and kernels)."""
