"""The task registry: what one batch item does, as a function of its input files and options.

A :class:`Task` names its input kinds (file paths), its options (typed, with defaults) and its outputs
(path templates under the output folder, ``{id}`` = the item id), and holds the function that
computes one item. The function reads the inputs, calls the library API (never the CLI) and writes
each output to the path it is given -- a temporary path: the runner moves it into place afterwards
(:mod:`ua3d.batch.store`), so a task never has to care about atomicity or resuming.

Built-in tasks: ``depth-sr``, ``upsample``, ``lift`` and ``fuse-frames`` (per-frame world-space
feature point clouds for a later fusion step). New tasks are added with :func:`register_task`; their
functions must be importable module-level functions so that worker processes (local pool or Ray) can
unpickle them. A fusion task fits the same mould with one item per *sequence*: an input kind whose path
is the ``fuse-frames`` output folder of that sequence (a folder input is fingerprinted by its files, so
new frames invalidate the fused result), read with :func:`ua3d.batch.frame_outputs`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .items import Item

__all__ = ["TASKS", "Option", "Task", "get_task", "register_task"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One task option: ``type`` is ``int``, ``float``, ``bool`` or ``str``; ``default`` None = unset."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None

    def parse(self, value: Any) -> Any:
        """``value`` (a manifest string, JSON value or Python value) as this option's type.

        Raises ``ValueError`` naming the option for a value of the wrong type or outside ``choices``.
        """
        if value is None:
            return None
        t, v = self.type, value
        try:
            if t is bool:
                if isinstance(v, str):
                    if v.strip().lower() not in _TRUE + _FALSE:
                        raise ValueError
                    v = v.strip().lower() in _TRUE
                elif not isinstance(v, bool):
                    raise ValueError
            elif t is int:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                v = int(v)
            elif t is float:
                if isinstance(v, bool):
                    raise ValueError
                v = float(v)
                if not math.isfinite(v):
                    raise ValueError
            else:
                v = str(v)
        except (TypeError, ValueError):
            raise ValueError(f"option {self.name!r} must be {t.__name__}, got {value!r}") from None
        if self.choices is not None and v not in self.choices:
            raise ValueError(f"option {self.name!r} must be one of {self.choices}, got {value!r}")
        return v


@dataclass(frozen=True)
class Task:
    """A batch task (module docstring).

    Attributes
    ----------
    name : CLI / API name (``"depth-sr"``).
    inputs : required input kinds.
    optional_inputs : input kinds that may be absent (e.g. ``gt``).
    options : the task's options.
    outputs : output name -> path template relative to the output folder (``"{id}.png"``).
    fn : ``fn(inputs: {kind: path}, options: {name: value}, outputs: {name: path}) -> dict`` with
        optional keys ``metrics`` (dict of floats), ``info`` (dict) and ``compute_s`` (float).
    version : bump it when the task's results change for the same options: old outputs are redone.
    help : one line for ``--help``.
    prepare : optional ``prepare(items) -> items`` run once in the driver before hashing (e.g. to
        give every frame its index in a trajectory).
    """

    name: str
    inputs: tuple[str, ...]
    options: tuple[Option, ...]
    outputs: dict[str, str]
    fn: Callable[[dict[str, str], dict[str, Any], dict[str, Path]], dict[str, Any]]
    optional_inputs: tuple[str, ...] = ()
    version: int = 1
    help: str = ""
    prepare: Callable[[list[Item]], list[Item]] | None = None
    input_help: dict[str, str] = field(default_factory=dict)

    @property
    def input_kinds(self) -> tuple[str, ...]:
        return self.inputs + self.optional_inputs

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise ValueError(
            f"unknown option {name!r} for task {self.name!r}; known: {', '.join(o.name for o in self.options)}"
        )

    def resolve_options(self, run_options: dict[str, Any], item_options: dict[str, Any]) -> dict[str, Any]:
        """Defaults, then the run's options, then the item's; every value parsed and checked."""
        out = {o.name: o.default for o in self.options}
        for layer in (run_options, item_options):
            for k, v in layer.items():
                if v is not None:
                    out[k] = self.option(k).parse(v)
        return out

    def output_paths(self, out: Path, item_id: str) -> dict[str, Path]:
        return {k: out / t.format(id=item_id) for k, t in self.outputs.items()}


TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` to :data:`TASKS` (``ValueError`` if the name is taken and not ``replace``)."""
    if not isinstance(task, Task):
        raise ValueError(f"task must be a Task, got {type(task).__name__}")
    if task.name in TASKS and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(task: str | Task) -> Task:
    """The registered task of that name (or ``task`` itself); ``ValueError`` lists the known names."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown batch task {task!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[task]


# ---------------------------------------------------------------------------------------- shared helpers
_SEED = Option("seed", int, 0, "random seed (torch.manual_seed before the item)")
_DEVICE = Option("device", str, "cpu", "torch device")
_DEPTH_SCALE = Option("depth_scale", float, 1000.0, "raw depth units per metre (1000 = mm, 5000 = TUM)")
_STEPS = Option("steps", int, 50, "TTO steps")
_RADIUS = Option("radius", float, None, "window radius in LR cells (default: FitConfig's)")
_LAYOUT = Option("layout", str, "auto", "feature file layout", ("auto", "chw", "hwc"))


def _guide(rgb, device):
    import torch

    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(device)


def _fit_config(opts: dict[str, Any]):
    from ua3d.core.tto import FitConfig

    kw = {"steps": opts["steps"], "seed": opts["seed"]}
    if opts.get("radius") is not None:
        kw["radius"] = opts["radius"]
    return FitConfig(**kw)


def _device(name: str):
    import torch

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("option device='cuda' but no CUDA device is available")
    return dev


# ---------------------------------------------------------------------------------------- depth-sr
def run_depth_sr(inputs: dict[str, str], opts: dict[str, Any], outputs: dict[str, Path]) -> dict[str, Any]:
    """RGB + LR depth (16-bit PNG) -> HR depth (16-bit PNG, same units); metrics against ``gt`` if given."""
    import numpy as np

    from ua3d.depth.sr import FAST, DepthSRConfig, upsample_depth
    from ua3d.io.rgbd import read_color, read_depth, write_depth

    dev = _device(opts["device"])
    rgb = read_color(inputs["rgb"])
    depth_lr = read_depth(inputs["depth"], depth_scale=opts["depth_scale"])
    cfg = FAST if opts["preset"] == "fast" else DepthSRConfig()
    extra = {} if opts["steps"] is None else {"fit_steps": opts["steps"]}
    import torch

    t0 = time.perf_counter()
    d = torch.from_numpy(depth_lr)[None, None].to(dev)
    out = upsample_depth(
        d, _guide(rgb, dev), config=cfg, scale=opts["scale"], fill_holes=opts["fill_holes"], **extra
    )
    hr = out[0, 0].cpu().numpy()
    compute_s = time.perf_counter() - t0
    write_depth(outputs["depth"], np.nan_to_num(hr, nan=0.0), depth_scale=opts["depth_scale"])
    info = {
        "lr_size": list(depth_lr.shape),
        "hr_size": list(hr.shape),
        "support": float(np.isfinite(hr).mean()),
    }
    metrics = None
    if inputs.get("gt"):
        from ua3d.depth.metrics import compute_metrics

        gt = read_depth(inputs["gt"], depth_scale=opts["depth_scale"])
        if gt.shape != hr.shape:
            raise ValueError(
                f"{inputs['gt']}: ground truth {gt.shape[1]}x{gt.shape[0]} does not match the "
                f"output {hr.shape[1]}x{hr.shape[0]}"
            )
        metrics = compute_metrics(hr, np.where(gt > 0, gt, np.nan).astype(np.float32))
    return {"metrics": metrics, "info": info, "compute_s": compute_s}


DEPTH_SR = Task(
    name="depth-sr",
    inputs=("rgb", "depth"),
    optional_inputs=("gt",),
    options=(
        _DEPTH_SCALE,
        Option("fill_holes", bool, False, "fill pixels without valid LR support"),
        Option("steps", int, None, "self-supervised depth-fit steps (default: the preset's)"),
        Option("preset", str, "default", "DepthSRConfig preset", ("default", "fast")),
        Option("scale", float, None, "expected HR/LR factor (checked when given)"),
        _SEED,
        _DEVICE,
    ),
    outputs={"depth": "{id}.png"},
    fn=run_depth_sr,
    help="RGB + LR depth (16-bit PNG) -> HR depth (16-bit PNG)",
    input_help={
        "rgb": "HR colour images",
        "depth": "LR depth, 16-bit PNG (0 = hole)",
        "gt": "optional HR ground-truth depth, 16-bit PNG in the same units (adds metrics)",
    },
)


# ---------------------------------------------------------------------------------------- upsample
def run_upsample(inputs: dict[str, str], opts: dict[str, Any], outputs: dict[str, Path]) -> dict[str, Any]:
    """Guide image + LR signal file -> HR signal ``[C, H, W]`` (``.npy``)."""
    import torch

    from ua3d.api import fit
    from ua3d.features.files import load_features, save_features
    from ua3d.io.rgbd import read_color

    dev = _device(opts["device"])
    rgb = read_color(inputs["image"])
    feats, _layout = load_features(inputs["signal"], layout=opts["layout"])
    t0 = time.perf_counter()
    k = fit(_guide(rgb, dev), tuple(feats.shape[-2:]), _fit_config(opts))
    out = k.render(feats.to(dev), out_dtype=torch.float16 if opts["half"] else None)
    compute_s = time.perf_counter() - t0
    save_features(outputs["signal"], out[0].cpu())
    return {
        "info": {"lr_shape": list(feats.shape[1:]), "hr_shape": list(out.shape[1:])},
        "compute_s": compute_s,
    }


UPSAMPLE = Task(
    name="upsample",
    inputs=("image", "signal"),
    options=(
        _STEPS,
        _RADIUS,
        _LAYOUT,
        Option("half", bool, False, "render in float16 (saved as float32)"),
        _SEED,
        _DEVICE,
    ),
    outputs={"signal": "{id}.npy"},
    fn=run_upsample,
    help="guide image + LR signal (.npy/.pt/.npz) -> HR signal (.npy)",
    input_help={"image": "guide images", "signal": "LR signal files, [C,h,w] or [h,w,C]"},
)


# ---------------------------------------------------------------------------------------- lift
def _lifted(inputs: dict[str, str], opts: dict[str, Any], pose=None):
    from ua3d.features.files import load_features
    from ua3d.io.rgbd import read_color, read_depth, read_intrinsics
    from ua3d.rgbd.lift import fit_rgbd

    dev = _device(opts["device"])
    rgb = read_color(inputs["rgb"])
    depth = read_depth(inputs["depth"], depth_scale=opts["depth_scale"])
    cam = read_intrinsics(inputs["intrinsics"])
    if pose is not None:
        cam = cam.with_pose(pose)
    feats, _ = load_features(inputs["features"], layout=opts["layout"])
    if depth.shape != rgb.shape[:2]:
        raise ValueError(
            f"{inputs['depth']}: depth {depth.shape[1]}x{depth.shape[0]} does not match the colour "
            f"image {rgb.shape[1]}x{rgb.shape[0]}"
        )
    t0 = time.perf_counter()
    lifted = fit_rgbd(
        _guide(rgb, dev), depth, cam, tuple(feats.shape[-2:]), _fit_config(opts), depth_max=opts["depth_max"]
    )
    return lifted, feats.to(dev), t0


def run_lift(inputs: dict[str, str], opts: dict[str, Any], outputs: dict[str, Path]) -> dict[str, Any]:
    """RGB-D + intrinsics + LR features -> feature volume (``volume.npz``) and point cloud (``points.npz``)."""
    import torch

    from ua3d.io.rgbd import save_volume
    from ua3d.rgbd.points import render_points
    from ua3d.rgbd.volume import render_volume

    lifted, feats, t0 = _lifted(inputs, opts)
    vol, mass, bins = render_volume(
        lifted, feats, bins=opts["bins"], out_dtype=torch.float16 if opts["half"] else None
    )
    pc = render_points(lifted, feats)
    compute_s = time.perf_counter() - t0
    save_volume(
        outputs["volume"], vol.float().cpu().numpy(), mass.cpu().numpy(), bins.cpu().numpy(), lifted.camera
    )
    pc.save(outputs["points"])
    return {"info": {"volume_shape": list(vol.shape), "points": len(pc)}, "compute_s": compute_s}


_LIFT_OPTIONS = (
    _DEPTH_SCALE,
    Option("depth_max", float, None, "depths beyond this (m) are holes"),
    _STEPS,
    _RADIUS,
    _LAYOUT,
    _SEED,
    _DEVICE,
)

LIFT = Task(
    name="lift",
    inputs=("rgb", "depth", "intrinsics", "features"),
    options=(
        *_LIFT_OPTIONS,
        Option("bins", int, 32, "depth bins of the volume"),
        Option("half", bool, False, "float16 volume render"),
    ),
    outputs={"volume": "{id}/volume.npz", "points": "{id}/points.npz"},
    fn=run_lift,
    help="RGB-D + intrinsics + LR features -> feature volume and point cloud",
    input_help={
        "rgb": "colour images",
        "depth": "depth, 16-bit PNG",
        "intrinsics": "Open3D intrinsics JSON (one file for all, or a glob)",
        "features": "LR feature files (.npy/.pt/.npz)",
    },
)


# ---------------------------------------------------------------------------------------- fuse-frames
def read_pose(path: str) -> Any:
    """A 4x4 camera-to-world matrix from ``.npy`` or a text file of 16 numbers (``ValueError`` otherwise)."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pose file not found: {p}")
    try:
        m = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"could not parse pose file {p}: {e}") from None
    if np.asarray(m).size != 16:
        raise ValueError(f"pose file {p} must hold a 4x4 matrix, got shape {np.asarray(m).shape}")
    return np.asarray(m, dtype=np.float64).reshape(4, 4)


def frame_pose(inputs: dict[str, str], opts: dict[str, Any]):
    """The frame's camera-to-world pose: its ``pose`` file, or entry ``frame`` of the ``trajectory``."""
    if inputs.get("pose"):
        return read_pose(inputs["pose"])
    if inputs.get("trajectory"):
        from ua3d.io.rgbd import read_trajectory_log

        poses = read_trajectory_log(inputs["trajectory"])
        i = opts["frame"]
        if i is None or not 0 <= i < len(poses):
            raise ValueError(
                f"frame index {i} is outside the trajectory {inputs['trajectory']} ({len(poses)} poses)"
            )
        return poses[i]
    raise ValueError("no pose: give a per-frame --pose file or a --trajectory (Redwood .log)")


def _index_frames(items: list[Item]) -> list[Item]:
    """Frames without a ``frame`` option get their position in id order (the trajectory's entry)."""
    out = []
    for i, it in enumerate(sorted(items, key=lambda x: x.id)):
        opts = dict(it.options)
        if "pose" not in it.inputs:  # the trajectory may also come as a shared input of the run
            opts.setdefault("frame", i)
        out.append(Item(it.id, dict(it.inputs), opts, it.source))
    return out


def run_fuse_frames(inputs: dict[str, str], opts: dict[str, Any], outputs: dict[str, Path]) -> dict[str, Any]:
    """One frame -> its lifted feature point cloud in **world** coordinates (``.npz``, the frame's pose applied).

    The file is :meth:`ua3d.rgbd.points.FeaturePointCloud.save`'s ``.npz`` (``world_frame = 1``); the pose
    and intrinsics are in the sidecar's ``info`` (see :func:`ua3d.batch.frame_outputs`).
    """
    from ua3d.rgbd.points import render_points

    pose = frame_pose(inputs, opts)
    lifted, feats, t0 = _lifted(inputs, opts, pose=pose)
    pc = render_points(lifted, feats, frame="world", colors=opts["colors"])
    compute_s = time.perf_counter() - t0
    pc.save(outputs["points"])
    return {
        "info": {
            "points": len(pc),
            "pose": lifted.camera.camera_to_world.tolist(),
            "camera": lifted.camera.to_dict(),
            "channels": int(pc.features.shape[1]),
        },
        "compute_s": compute_s,
    }


FUSE_FRAMES = Task(
    name="fuse-frames",
    inputs=("rgb", "depth", "intrinsics", "features"),
    optional_inputs=("pose", "trajectory"),
    options=(
        *_LIFT_OPTIONS,
        Option("colors", str, "rgb", "point colours", ("rgb", "pca")),
        Option("frame", int, None, "entry of --trajectory (default: the item's position in id order)"),
    ),
    outputs={"points": "{id}.npz"},
    fn=run_fuse_frames,
    help="per-frame world-space feature point clouds (pose applied) for a later fusion step",
    prepare=_index_frames,
    input_help={
        "rgb": "colour images",
        "depth": "depth, 16-bit PNG",
        "intrinsics": "Open3D intrinsics JSON",
        "features": "LR feature files",
        "pose": "per-frame 4x4 camera-to-world (.npy or text)",
        "trajectory": "one Redwood .log for all frames (entry = frame index)",
    },
)

for _t in (DEPTH_SR, UPSAMPLE, LIFT, FUSE_FRAMES):
    register_task(_t)
