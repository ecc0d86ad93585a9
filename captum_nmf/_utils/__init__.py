"""Private helpers: input validation, activation capture, solver kernels, CPU count."""
