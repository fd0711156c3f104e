"""Benchmarks (never timed tests): `avatar bench raster`."""
