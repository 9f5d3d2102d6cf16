#!/usr/bin/env python
"""Thin shim: the viewer lives in the package as :mod:`ua3d.viz.feature_points` (same options; also ``ua3d view``)."""

from ua3d.viz.feature_points import main

if __name__ == "__main__":
    raise SystemExit(main())
