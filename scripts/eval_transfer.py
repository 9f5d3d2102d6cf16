#!/usr/bin/env python
"""Transfer benchmark: a thin wrapper of :mod:`ua3d.eval.transfer` (same options as ``ua3d eval transfer``).

python scripts/eval_transfer.py --quick --threads 1
python scripts/eval_transfer.py --threads 2 --json bench_results/eval_transfer.json
python scripts/eval_transfer.py --tasks labels --set guide_downsample=bilinear --depth-weight 1
"""

from __future__ import annotations

import argparse
import sys

from ua3d.eval.transfer import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
