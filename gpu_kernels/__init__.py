"""The CuPy engine (issue 4). Intentionally empty until it exists: no fake engine."""
