"""Dataset-scale runs: one task over many items, resumable, on a local process pool or on Ray.

>>> from ua3d import batch
>>> sorted(batch.TASKS)
['depth-sr', 'fuse-frames', 'lift', 'upsample']

``batch.run("depth-sr", {"rgb": "data/*_color.png", "depth": "lr/*_depth.png"}, out="hr/", workers=2)``
runs every item, skips those already done with the same configuration, and returns a
:class:`BatchSummary` (done / skipped / failed). The CLI is ``ua3d batch <task> ...``. Items come from
one glob per input kind or a manifest (:mod:`ua3d.batch.items`); the resume and atomic-write rules are
in :mod:`ua3d.batch.store`, the engines in :mod:`ua3d.batch.runner`, the tasks in :mod:`ua3d.batch.tasks`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .items import Item, discover, read_manifest
from .runner import ENGINES, BatchSummary, execute_item, run
from .tasks import TASKS, Option, Task, get_task, register_task

__all__ = [
    "ENGINES",
    "TASKS",
    "BatchSummary",
    "Item",
    "Option",
    "Task",
    "discover",
    "execute_item",
    "frame_outputs",
    "get_task",
    "read_manifest",
    "register_task",
    "run",
]


def frame_outputs(out: str | Path) -> list[dict[str, Any]]:
    """The finished ``fuse-frames`` items of an output folder, for a fusion step to consume.

    Returns
    -------
    One dict per done frame, sorted by id: ``id``, ``points`` (path of the world-space
    :class:`~ua3d.rgbd.points.FeaturePointCloud` ``.npz``), ``pose`` (4x4 camera-to-world, nested lists),
    ``camera`` (:meth:`PinholeCamera.to_dict`) and ``frame`` (trajectory index or None).
    """
    root = Path(out)
    frames = []
    for side in sorted(root.rglob("*.json")):
        if side.name.startswith(("_", ".")):
            continue
        try:
            d = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict) or d.get("task") != "fuse-frames" or d.get("status") != "done":
            continue
        pts = Path(d["outputs"]["points"]["path"])
        if not pts.is_file():
            continue
        info = d.get("info") or {}
        frames.append(
            {
                "id": d["id"],
                "points": str(pts),
                "pose": info.get("pose"),
                "camera": info.get("camera"),
                "frame": (d.get("options") or {}).get("frame"),
            }
        )
    return sorted(frames, key=lambda f: f["id"])
