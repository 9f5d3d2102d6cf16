"""Wall time of ``ua3d demo`` (full, not ``--tiny``) and of ``ua3d view volume --png`` on its volume,
per source tree, run alternately (tree A, tree B, tree A, ...) so that both see the same load.

Each run is a fresh process ``python -m ua3d.cli demo --quiet --out DIR`` started in the tree with
``PYTHONPATH=<tree>`` (imports included, as a user sees them). Per run: wall seconds, user and system
CPU seconds and peak RSS of the child (``os.wait4``), and the demo's own stage timers from
``summary.json``. The table shows the median over ``--repeats`` and, with two trees, the per-round
ratio second/first (median and range). The JSON has every run, the machine and the versions.

    python scripts/bench_demo.py --repeats 3                                   # this tree only
    git worktree add --detach /tmp/demo-old main
    python scripts/bench_demo.py --tree old=/tmp/demo-old --tree new=. --repeats 3 --view \\
        --json bench_results/demo/demo_ab.json

The machine is shared: figures taken with other jobs running are "under load" (the JSON records
the load average before and after every run); compare trees by the ratios of one window.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_info

STAGES = ("load", "features", "fit-2d", "lift", "depth-sr", "pictures", "total")


def _run(cmd: list[str], tree: Path, env_extra: dict[str, str]) -> dict:
    """Run ``cmd`` in ``tree``; wall, CPU and peak RSS of the child process."""
    env = {**os.environ, "PYTHONPATH": str(tree), **env_extra}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {tree} failed ({p.returncode}):\n{err[-2000:]}")
    return {
        "wall_s": round(wall, 3),
        "user_s": round(ru.ru_utime, 3),
        "sys_s": round(ru.ru_stime, 3),
        "peak_rss_gib": round(ru.ru_maxrss / 2**20, 3),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def run_demo(tree: Path, out: Path, view: bool, env_extra: dict[str, str]) -> dict:
    """One demo run in ``tree`` writing to ``out`` (and the viewer on its volume with ``view``)."""
    r = _run([sys.executable, "-m", "ua3d.cli", "demo", "--quiet", "--out", str(out)], tree, env_extra)
    s = json.loads((out / "summary.json").read_text())
    r["stages_s"] = {k: s["timings_s"].get(k) for k in STAGES}
    r["fused_map_s"] = s.get("fused_map", {}).get("seconds")
    r["pictures"] = s.get("pictures")
    r["files_bytes"] = s.get("files_bytes")
    if view:
        cmd = [sys.executable, "-m", "ua3d.cli", "view", "volume", str(out / "volume.npz")]
        r["view"] = _run(cmd + ["--png", str(out / "view.png"), "--quiet"], tree, env_extra)
    return r


def _median(runs: list[dict], key: str, sub: str | None = None) -> float | None:
    vals = [v for v in (_value(r, key, sub) for r in runs) if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def _value(run: dict, key: str, sub: str | None) -> float | None:
    return (run.get(sub) or {}).get(key) if sub else run.get(key)


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Rows ``{"what", <tree>: median, ..., "ratio": [median, min, max] of the last tree over the first}``."""
    names = list(runs)
    keys = [("wall_s", None), ("user_s", None), ("sys_s", None), ("peak_rss_gib", None)]
    keys += [(k, "stages_s") for k in STAGES] + [("fused_map_s", None)]
    if all("view" in r for rs in runs.values() for r in rs):
        keys += [("wall_s", "view"), ("user_s", "view"), ("peak_rss_gib", "view")]
    rows = []
    for key, sub in keys:
        row: dict = {"what": f"{sub}.{key}" if sub else key}
        for n in names:
            row[n] = _median(runs[n], key, sub)
        if len(names) >= 2:
            a, b = runs[names[0]], runs[names[-1]]
            pairs = [(_value(x, key, sub), _value(y, key, sub)) for x, y in zip(a, b)]
            ratios = [vy / vx for vx, vy in pairs if vx and vy is not None]
            if ratios:
                row["ratio"] = [
                    round(statistics.median(ratios), 3),
                    round(min(ratios), 3),
                    round(max(ratios), 3),
                ]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tree",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a source tree to run (repeatable; default: this checkout as 'this'); the ratio is last/first",
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each tree once per round; default 3)")
    ap.add_argument("--view", action="store_true", help="also time `ua3d view volume --png` on each volume")
    ap.add_argument("--threads", type=int, default=None, help="set OMP/NUMBA threads (default: the demo's)")
    ap.add_argument("--json", type=Path, default=None, help="write every run and the table here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs under this folder")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    trees: dict[str, Path] = {}
    for spec in args.tree or [f"this={Path(__file__).resolve().parents[1]}"]:
        name, sep, path = spec.partition("=")
        if not sep or not name or not (Path(path) / "ua3d" / "demo.py").is_file():
            raise SystemExit(f"--tree must be NAME=PATH of a ua3d source tree, got {spec!r}")
        trees[name] = Path(path).resolve()
    env_extra = {}
    if args.threads:
        env_extra = {
            k: str(args.threads) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS")
        }
    base = Path(args.keep or tempfile.mkdtemp(prefix="ua3d-bench-demo-"))
    runs: dict[str, list[dict]] = {n: [] for n in trees}
    for k in range(args.repeats):
        for n, tree in trees.items():
            r = run_demo(tree, base / f"{n}-{k}", args.view, env_extra)
            runs[n].append(r)
            st = r["stages_s"]
            print(
                f"round {k} {n:>6}: wall {r['wall_s']:.2f} s (user {r['user_s']:.1f}, sys {r['sys_s']:.1f}, "
                f"load {r['load_before']:.1f}) stages "
                + " ".join(f"{s} {st[s]:.2f}" for s in STAGES if st.get(s) is not None)
                + (f"; view {r['view']['wall_s']:.2f} s" if "view" in r else ""),
                flush=True,
            )
    rows = summarize(runs)
    names = list(trees)
    head = f"{'median of ' + str(args.repeats):24s}" + "".join(f"{n:>10s}" for n in names)
    head += f"  {'ratio ' + names[-1] + '/' + names[0]:>24s}" if len(names) > 1 else ""
    print("\n" + head)
    for row in rows:
        line = f"{row['what']:24s}" + "".join(
            f"{row[n]:>10.3f}" if row[n] is not None else f"{'-':>10s}" for n in names
        )
        if "ratio" in row:
            m, lo, hi = row["ratio"]
            line += f"  {m:>10.3f} ({lo:.3f}-{hi:.3f})"
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = machine_info(args.threads, trees={n: str(t) for n, t in trees.items()}, repeats=args.repeats)
        args.json.write_text(json.dumps({"machine": info, "table": rows, "runs": runs}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
