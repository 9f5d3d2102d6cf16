"""CPU cost of the demo's volume I/O on its critical path: the old way (write ``volume.npz`` with
``np.savez_compressed``, read it back, pool a float32 copy for the picture) against the new one (check
the in-memory float16 volume once, pool it channel by channel; the level-1 file is written in a thread,
off the critical path: its cost is listed apart).

Input: a ``volume.npz`` written by ``ua3d demo`` (``--volume``). CPU seconds (``time.process_time``) and
wall seconds, one thread, the median of ``--repeats`` alternating rounds (old, new, old, new...).

    python scripts/bench_demo_io.py --volume ua3d-demo/volume.npz --json bench_results/demo_io.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import machine_info


def _old_downsample(volume, mass, s):
    """The viewer's pooling before issue 16 (a float32 copy of the whole volume)."""
    C, D, H, W = volume.shape
    h, w = H // s, W // s
    v = volume[..., : h * s, : w * s].reshape(C, D, h, s, w, s)
    m = mass[:, : h * s, : w * s].reshape(D, h, s, w, s)
    m_sum = m.sum(axis=(2, 4))
    return ((v * m[None]).sum(axis=(3, 5)) / np.where(m_sum > 0, m_sum, 1.0)[None]).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volume", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from ua3d.io.rgbd import load_volume, save_volume, volume_record
    from ua3d.viz.volume_slices import auto_stride, downsample_volume

    with np.load(args.volume) as z:
        vol16, mass = z["volume"], z["mass"]
    d = load_volume(args.volume)
    cam, bins, rgb, depth = d["camera"], d["bin_depths"], d["rgb"], d["depth"]
    del d
    s = auto_stride(cam.height, cam.width)
    tmp = Path(tempfile.mkdtemp(prefix="ua3d-demo-io-"))

    def clock(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    def old():
        p = save_volume(tmp / "old.npz", vol16, mass, bins, cam, rgb, depth, compressed=True)
        v = load_volume(p, dtype=np.float32)  # the float32 copy load_volume made before issue 16
        _old_downsample(v["volume"], v["mass"], s)

    def new():
        rec = volume_record(vol16, mass, bins, cam, rgb, depth)
        downsample_volume(rec["volume"], rec["mass"], cam, s)

    def thread_part():  # what the demo's writer thread does (off the critical path)
        save_volume(tmp / "new.npz", vol16, mass, bins, cam, rgb, depth, compressed=True, compress_level=1)

    rows = {"old (critical path)": [], "new (critical path)": [], "new: writer thread": []}
    for _ in range(args.repeats):
        rows["old (critical path)"].append(clock(old))
        rows["new (critical path)"].append(clock(new))
        rows["new: writer thread"].append(clock(thread_part))
    sizes = {"old level 6": (tmp / "old.npz").stat().st_size, "new level 1": (tmp / "new.npz").stat().st_size}
    res = {
        k: {"wall_s": statistics.median(w for w, _ in v), "cpu_s": statistics.median(c for _, c in v)}
        for k, v in rows.items()
    }
    print(
        f"demo volume {list(vol16.shape)} {vol16.dtype}, stride {s}, {args.repeats} alternating rounds, 1 thread"
    )
    print("| what | wall s | CPU s |\n|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v['wall_s']:.2f} | {v['cpu_s']:.2f} |")
    print("files: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": machine_info(1), "results": res, "bytes": sizes}, indent=2))


if __name__ == "__main__":
    main()
