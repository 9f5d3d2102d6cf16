#!/usr/bin/env python
"""Write the bundled synthetic RGB-D sample to ``ua3d/sample_data/`` (package data) (deterministic).

Usage: ``python scripts/make_sample_data.py [--out ua3d/sample_data] [--seed 0] [--width 640 --height 480]``
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from ua3d.io.rgbd import write_color, write_depth, write_ids, write_intrinsics, write_trajectory_log
from ua3d.rgbd.synthetic import make_scene

HOLES = 8

README = """# Sample RGB-D frame (synthetic)

One synthetic RGB-D frame made by `scripts/make_sample_data.py` with
`ua3d.rgbd.synthetic.make_scene(seed={seed}, width={width}, height={height}, n_objects=4)`:
a textured ground plane and back wall with boxes and spheres, ray-cast with Open3D's
`RaycastingScene` (spheres analytically), procedural checker/stripe/ring textures (texture edges
that are not depth edges; one object wears the wall's texture and one the ground's, so only depth
separates them). Regenerate with `python scripts/make_sample_data.py`; the output is deterministic.

| file | content |
|---|---|
| `rgb.png` | 8-bit RGB, {width}x{height} |
| `depth.png` | 16-bit z-depth in millimetres (depth_scale 1000), exact up to rounding; 0 = nothing hit |
| `depth_holes.png` | same with {holes} random elliptic dropout blobs set to 0 (sensor-like holes) |
| `ids.png` | 8-bit object id: 0 none, 1 ground, 2 back wall, 3.. objects ({objects}) |
| `intrinsics.json` | Open3D intrinsics JSON (column-major `intrinsic_matrix`): fx = fy = {fx:g}, cx = {cx:g}, cy = {cy:g} |
| `trajectory.log` | Redwood `.log` with the one camera-to-world pose (world: y up, ground at y = 0) |

Pixel convention as Open3D: x = (u - cx) z / fx, y = (v - cy) z / fy, integer pixel centres.
Read with `ua3d.io.rgbd.read_color / read_depth / read_ids / read_intrinsics / read_trajectory_log`.

SHA-256 of the images (for checking a regeneration):

{hashes}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "ua3d" / "sample_data"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    scene = make_scene(args.seed, args.width, args.height, n_objects=4, holes=HOLES)
    cam = scene["camera"]
    write_color(out / "rgb.png", scene["rgb"])
    write_depth(out / "depth.png", scene["depth_gt"])
    write_depth(out / "depth_holes.png", scene["depth"])
    write_ids(out / "ids.png", scene["ids"])
    write_intrinsics(out / "intrinsics.json", cam)
    write_trajectory_log(out / "trajectory.log", cam.pose[None])

    names = ("rgb.png", "depth.png", "depth_holes.png", "ids.png")
    hashes = "\n".join(f"    {hashlib.sha256((out / n).read_bytes()).hexdigest()}  {n}" for n in names)
    objects = ", ".join(
        f"{o['id']} {o['kind']}{' (camouflage)' if o['camouflage'] else ''}" for o in scene["objects"][2:]
    )
    (out / "README.md").write_text(
        README.format(
            seed=args.seed,
            width=args.width,
            height=args.height,
            holes=HOLES,
            objects=objects,
            fx=cam.fx,
            cx=cam.cx,
            cy=cam.cy,
            hashes=hashes,
        )
    )
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    valid = scene["depth_gt"] > 0
    print(
        f"wrote {out} ({total / 1e6:.2f} MB); depth {scene['depth_gt'][valid].min():.3f}-"
        f"{scene['depth_gt'].max():.3f} m, ids {np.unique(scene['ids']).tolist()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
