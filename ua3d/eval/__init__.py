"""Benchmarks that judge a kernel by what it renders (see :mod:`ua3d.eval.transfer`)."""
