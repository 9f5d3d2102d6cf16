#!/usr/bin/env python
"""Evaluate guided depth super-resolution methods (thin wrapper around ``ua3d.depth.evaluate.main``).

Example::

    python scripts/eval_depth_sr.py --dataset middlebury-gdsr --root ../shared/data/middlebury-gdsr-dev \\
        --scales 4 8 16 --protocol B --methods nearest,bilinear,bicubic,guided --json out/mb_B.json
"""

from ua3d.depth.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
