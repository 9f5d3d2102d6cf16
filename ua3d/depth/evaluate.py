"""Guided depth super-resolution evaluation harness: method registry, :func:`evaluate` and the CLI.

A *method* has the call shape of :mod:`ua3d.depth.baselines`::

    method(depth_lr [B, 1, h, w], guide_hr [B, 3, H, W] in [0, 1], *, mask_lr=None, **options)
        -> depth_hr [B, 1, H, W]   (NaN where it has no support)

Registered: ``nearest, bilinear, bicubic, guided`` (always available) and, imported only when asked for,
``jbu`` (``ua3d.baselines.jbu``, classic joint bilateral upsampling), ``ua3d``
(``ua3d.depth.sr.upsample_depth``) and ``anyup`` (``ua3d.baselines.anyup.anyup_depth``; needs local weights
given as the option ``anyup.checkpoint``, on the command line ``--anyup-checkpoint PATH``). Add more with
:func:`register_method`.

Literature conventions applied per dataset (:data:`CONVENTIONS`): Middlebury GDSR RMSE in its 0-255 units,
no border crop, prediction clipped to [0, 255] (DCTNet's ``test.py``); NYUv2 RMSE in cm with a 6-pixel
border crop. Scores are the mean over images of the per-image metric; edge RMSE is taken within
``edge_dilate`` (3) pixels of the ground truth's depth discontinuities.

Real sensor data: ``park2011`` comes with its own noisy LR inputs and confidence maps (``protocol="given"``,
the confidence is passed to the methods that take one, i.e. ``ua3d``); the real frames (``redwood``, ``tum``,
``sunrgbd``, ``nyu-raw``) use the sensor's own 640x480 depth as the target and an LR depth made by a
sensor-like model (``protocol="area"``: the mean of the valid pixels of each block, with holes; ``"A"`` /
``"A-start"``: point sampling). Every record counts the predictions that a hole could have leaked into
(``n_leak``: finite predictions below half the smallest valid LR depth, e.g. 0), and the CPU time.

Command line (``ua3d eval depth-sr``; :func:`add_arguments` + :func:`run`, :func:`main` for scripts)::

    python scripts/eval_depth_sr.py --dataset middlebury-gdsr --root ../shared/data/middlebury-gdsr-dev \\
        --scales 4 8 16 --protocol B --methods bicubic,guided --json out/mb.json
    python scripts/eval_depth_sr.py --dataset middlebury-gdsr --root ../shared/data/middlebury-gdsr-dev \\
        --scales 4 --methods bicubic,anyup --anyup-checkpoint ~/weights/anyup_multi_backbone.pth
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ua3d.depth import baselines
from ua3d.depth.datasets import DATASETS, Sample, load_dataset, sample_to_tensors
from ua3d.depth.metrics import compute_metrics
from ua3d.depth.protocols import DESCRIPTIONS, PROTOCOLS, make_lr

#: protocols of :func:`evaluate`: those of :func:`make_lr` and ``"given"`` (the dataset ships its LR inputs)
EVAL_PROTOCOLS = (*PROTOCOLS, "given")

__all__ = [
    "CONVENTIONS",
    "Convention",
    "add_arguments",
    "available_methods",
    "evaluate",
    "format_table",
    "get_method",
    "main",
    "register_method",
    "run",
]

DepthMethod = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Convention:
    """How a dataset is scored.

    Attributes
    ----------
    units : str
        Units of the reported errors.
    unit_scale : float
        Multiplier from the dataset's depth units to ``units`` (m -> cm: 100).
    crop : int
        Border crop in pixels on every side.
    clip : tuple of float or None
        Clamp applied to predictions before scoring.
    edge_dilate : int
        Edge RMSE is scored within this many pixels of a GT depth discontinuity.
    """

    units: str
    unit_scale: float = 1.0
    crop: int = 0
    clip: tuple[float, float] | None = None
    edge_dilate: int = 3


CONVENTIONS: dict[str, Convention] = {
    "middlebury-gdsr": Convention("0-255", 1.0, 0, (0.0, 255.0)),
    "nyuv2": Convention("cm", 100.0, 6),
    "middlebury2005": Convention("mm"),
    "middlebury2014": Convention("mm"),
    "motorcycle": Convention("mm"),
    "redwood": Convention("cm", 100.0),
    "tum": Convention("cm", 100.0),
    "sunrgbd": Convention("cm", 100.0),
    "nyu-raw": Convention("cm", 100.0),
    "park2011": Convention("0-255", 1.0, 0, (0.0, 255.0)),
}

#: datasets whose frames are real sensor depth (the protocol defaults to "area" for them)
SENSOR_DATASETS = ("redwood", "tum", "sunrgbd", "nyu-raw")

# ----------------------------------------------------------------------------------------------------------
# method registry
# ----------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[], DepthMethod]] = {}


def register_method(
    name: str, method: DepthMethod | None = None, *, factory: Callable[[], DepthMethod] | None = None
) -> None:
    """Register a method: either the callable itself or a ``factory`` that imports and returns it.

    A factory runs only when the method is requested (:func:`get_method`), so optional dependencies are
    not imported by the harness otherwise.
    """
    if (method is None) == (factory is None):
        raise ValueError(f"register_method({name!r}): give exactly one of method and factory")
    _REGISTRY[name] = factory if factory is not None else (lambda: method)


def available_methods() -> list[str]:
    """Registered method names (lazy ones included, whether or not their module imports)."""
    return list(_REGISTRY)


def get_method(name: str) -> DepthMethod:
    """Resolve a registered method, importing it if it is lazy.

    Raises
    ------
    ValueError
        Unknown name.
    ImportError
        A lazy method whose implementation is missing (message names the module it needs).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


def _normalised_call(
    fn: Callable[[torch.Tensor], torch.Tensor], depth_lr: torch.Tensor, valid: torch.Tensor, min_weight: float
) -> torch.Tensor:
    """Run a linear, positive-weight upsampler on ``[depth * valid, valid]`` and divide (holes excluded)."""
    zero = torch.zeros_like(depth_lr)
    both = fn(torch.cat([torch.where(valid, depth_lr, zero), valid.to(depth_lr.dtype)], dim=1))
    num, den = both[:, :1], both[:, 1:]
    out = num / den.clamp_min(min_weight)
    return torch.where(den > min_weight, out, torch.full_like(out, math.nan))


def _jbu_factory() -> DepthMethod:
    try:
        from ua3d.baselines import jbu
    except ImportError as err:
        raise ImportError(
            f"method 'jbu' needs ua3d.baselines.jbu (classic joint bilateral upsampling), which cannot be "
            f"imported: {err}"
        ) from err

    def jbu_depth(
        depth_lr: torch.Tensor,
        guide_hr: torch.Tensor,
        *,
        mask_lr: torch.Tensor | None = None,
        min_weight: float = 1e-3,
        **options: Any,
    ) -> torch.Tensor:
        """``ua3d.baselines.jbu`` with holes excluded by normalised convolution (NaN below ``min_weight``)."""
        size = tuple(guide_hr.shape[-2:])
        valid = baselines.lr_valid_mask(depth_lr, mask_lr)
        if bool(valid.all()):
            return jbu(guide_hr, depth_lr, size, **options)
        return _normalised_call(lambda s: jbu(guide_hr, s, size, **options), depth_lr, valid, min_weight)

    return jbu_depth


def _ua3d_factory() -> DepthMethod:
    try:
        from ua3d.depth.sr import upsample_depth
    except ImportError as err:
        raise ImportError(
            f"method 'ua3d' needs ua3d.depth.sr.upsample_depth (Upsample Anything depth SR), which cannot be "
            f"imported: {err}"
        ) from err
    params = inspect.signature(upsample_depth).parameters
    takes_mask = "mask_lr" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def ua3d_depth(
        depth_lr: torch.Tensor, guide_hr: torch.Tensor, *, mask_lr: torch.Tensor | None = None, **options: Any
    ) -> torch.Tensor:
        """``ua3d.depth.sr.upsample_depth`` (holes passed on as ``mask_lr`` when it accepts one)."""
        if takes_mask:
            return upsample_depth(depth_lr, guide_hr, mask_lr=mask_lr, **options)
        if not bool(baselines.lr_valid_mask(depth_lr, mask_lr).all()):
            raise ValueError("ua3d.depth.sr.upsample_depth takes no mask_lr, but depth_lr has holes")
        return upsample_depth(depth_lr, guide_hr, **options)

    ua3d_depth.accepts_confidence = True  # type: ignore[attr-defined]
    return ua3d_depth


#: Printed when ``anyup`` is requested without weights (ua3d never downloads any).
ANYUP_WEIGHTS_HINT = (
    "method 'anyup' needs AnyUp weights: download anyup_paper.pth or anyup_multi_backbone.pth from the "
    "wimmerth/anyup GitHub releases (https://github.com/wimmerth/anyup/releases) and pass --anyup-checkpoint "
    "PATH (in Python: options={'anyup': {'checkpoint': PATH}}); ua3d never downloads weights"
)


def _anyup_factory() -> DepthMethod:
    try:
        from ua3d.baselines import anyup as anyup_module
    except ImportError as err:
        raise ImportError(
            f"method 'anyup' needs ua3d.baselines.anyup (the AnyUp baseline), which cannot be imported: {err}"
        ) from err
    models: dict[tuple[Any, ...], Any] = {}  # loaded once per evaluation (one factory call per evaluate())

    def anyup_depth(
        depth_lr: torch.Tensor,
        guide_hr: torch.Tensor,
        *,
        mask_lr: torch.Tensor | None = None,
        checkpoint: str | os.PathLike | None = None,
        min_weight: float = 1e-3,
        **model_options: Any,
    ) -> torch.Tensor:
        """``ua3d.baselines.anyup.anyup_depth`` with the weights of ``checkpoint``, loaded on first use.

        Holes are excluded (normalised attention over ``[depth * valid, valid]``, NaN where the attention mass
        on valid pixels is ``<= min_weight``). ``model_options`` go to :class:`ua3d.baselines.anyup.AnyUp`
        (e.g. ``window_ratio``).
        """
        if checkpoint is None:
            raise ValueError(ANYUP_WEIGHTS_HINT)
        dtype = depth_lr.dtype if depth_lr.is_floating_point() else torch.float32
        key = (str(checkpoint), str(depth_lr.device), dtype, tuple(sorted(model_options.items())))
        if key not in models:
            try:
                model = anyup_module.load_anyup(checkpoint, map_location=depth_lr.device, **model_options)
            except FileNotFoundError as err:
                raise ValueError(f"{err}; {ANYUP_WEIGHTS_HINT}") from err
            models[key] = model.to(dtype=dtype)
        return anyup_module.anyup_depth(
            depth_lr.to(dtype), guide_hr.to(dtype), model=models[key], mask_lr=mask_lr, min_weight=min_weight
        )

    return anyup_depth


def _check_anyup_checkpoint(methods: str, options: dict[str, dict[str, Any]]) -> None:
    """Fail early (before any data is read) when ``anyup`` is requested without a readable checkpoint file."""
    if "anyup" not in [m.strip() for m in methods.split(",")]:
        return
    checkpoint = options.get("anyup", {}).get("checkpoint")
    if checkpoint is None:
        raise ValueError(ANYUP_WEIGHTS_HINT)
    if not Path(checkpoint).is_file():
        raise ValueError(f"AnyUp checkpoint not found: {checkpoint}; {ANYUP_WEIGHTS_HINT}")


register_method("nearest", baselines.nearest)
register_method("bilinear", baselines.bilinear)
register_method("bicubic", baselines.bicubic)
register_method("guided", baselines.guided)
register_method("jbu", factory=_jbu_factory)
register_method("ua3d", factory=_ua3d_factory)
register_method("anyup", factory=_anyup_factory)

# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import PIL

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }
    try:
        import cv2

        out["opencv"] = cv2.__version__
    except ImportError:  # pragma: no cover - optional here
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        out["ua3d"] = version("ua3d")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        out["ua3d"] = "unknown"
    return out


def _finite_mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def _timed(
    fn: DepthMethod, depth_lr: torch.Tensor, guide: torch.Tensor, options: dict[str, Any]
) -> tuple[torch.Tensor, float, float]:
    sync = torch.cuda.synchronize if depth_lr.is_cuda else (lambda: None)
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = fn(depth_lr, guide, **options)
    sync()
    return out, time.perf_counter() - start, time.process_time() - cpu


def _read_lr(path: str) -> np.ndarray:
    from PIL import Image

    lr = np.asarray(Image.open(path)).astype(np.float32)
    lr[~(lr > 0)] = np.nan
    return lr


def _given_pair(
    sample: Sample, depth: np.ndarray, scale: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """HR target, the dataset's own LR input at ``scale`` and its confidence map (HR size) if shipped."""
    inputs = sample.meta.extra.get("lr_inputs", {})
    if scale not in inputs:
        raise ValueError(
            f"{sample.meta.dataset}/{sample.name} has no LR input at x{scale}; available: {sorted(inputs)}"
        )
    lr = _read_lr(inputs[scale])
    hr = depth[: lr.shape[0] * scale, : lr.shape[1] * scale]
    if hr.shape != (lr.shape[0] * scale, lr.shape[1] * scale):
        raise ValueError(
            f"{inputs[scale]}: LR {lr.shape} times {scale} does not fit the target {depth.shape}"
        )
    conf = None
    wpath = sample.meta.extra.get("weights", {}).get(scale)
    if wpath is not None:
        from PIL import Image

        conf = np.asarray(Image.open(wpath)).astype(np.float32)[: hr.shape[0], : hr.shape[1]]
    return hr, lr, conf


def _evaluate_sample(
    sample: Sample,
    scales: Sequence[int],
    protocol: str,
    methods: dict[str, DepthMethod],
    options: dict[str, dict[str, Any]],
    conv: Convention,
    device: torch.device,
    progress: Any,
) -> list[dict[str, Any]]:
    rgb, depth = sample.load()
    records = []
    for scale in scales:
        conf = None
        if protocol == "given":
            hr, lr, conf = _given_pair(sample, depth, scale)
        else:
            hr, lr = make_lr(depth, scale, protocol)
        guide, gt = sample_to_tensors(rgb[: hr.shape[0], : hr.shape[1]], hr)
        guide = guide.to(device)
        depth_lr = torch.from_numpy(lr)[None, None].to(device)
        lr_valid = lr[np.isfinite(lr) & (lr > 0)]
        leak_below = 0.5 * float(lr_valid.min()) if lr_valid.size else math.inf
        for name, fn in methods.items():
            opts = dict(options.get(name, {}))
            if conf is not None and getattr(fn, "accepts_confidence", False):
                opts.setdefault("confidence", torch.from_numpy(conf).to(device))
            pred, seconds, cpu = _timed(fn, depth_lr, guide, opts)
            if tuple(pred.shape) != (1, 1, *hr.shape):
                raise ValueError(
                    f"method {name!r} returned shape {tuple(pred.shape)}, expected {(1, 1, *hr.shape)}"
                )
            p = pred[0, 0].cpu()
            scores = compute_metrics(
                p, gt[0, 0], crop=conv.crop, scale=conv.unit_scale, clip=conv.clip, dilate=conv.edge_dilate
            )
            fin = torch.isfinite(p)
            records.append(
                {
                    "image": sample.name,
                    "scale": scale,
                    "method": name,
                    "time_s": seconds,
                    "cpu_s": cpu,
                    "hr_shape": list(hr.shape),
                    "lr_shape": list(lr.shape),
                    "lr_holes": float(np.mean(~(np.isfinite(lr) & (lr > 0)))),
                    "n_leak": int((fin & (p < leak_below)).sum()),
                    "pred_min": float(p[fin].min()) if bool(fin.any()) else math.nan,
                    **scores,
                }
            )
        progress.update(1)
    return records


def _summarise(
    records: list[dict[str, Any]], methods: Sequence[str], scales: Sequence[int]
) -> dict[str, dict[str, dict[str, float]]]:
    keys = ("rmse", "mae", "delta1", "delta2", "delta3", "edge_rmse", "coverage", "time_s", "cpu_s")
    bic = {(r["image"], r["scale"]): r["rmse"] for r in records if r["method"] == "bicubic"}
    mean: dict[str, dict[str, dict[str, float]]] = {}
    for m in methods:
        mean[m] = {}
        for s in scales:
            rows = [r for r in records if r["method"] == m and r["scale"] == s]
            cell = {k: _finite_mean([r[k] for r in rows]) for k in keys} | {"n_images": len(rows)}
            cell["n_leak"] = sum(r["n_leak"] for r in rows)
            ratios = [r["rmse"] / bic[(r["image"], s)] for r in rows if bic.get((r["image"], s))]
            cell["worst_vs_bicubic"] = max(ratios) if ratios else math.nan
            mean[m][str(s)] = cell
    return mean


_METRIC_NAMES = {"rmse": "RMSE", "edge_rmse": "edge RMSE", "mae": "MAE"}


def format_table(result: dict[str, Any], metrics: Sequence[str] | None = None) -> str:
    """Markdown tables of mean per-image metrics (methods x scales), captioned with units and protocol.

    One table per metric of ``metrics`` (default: the ``metrics`` setting, else ``("rmse",)``); the RMSE
    table also gives the time per image (wall and CPU), the worst per-image RMSE ratio to bicubic (when
    bicubic was run) and the number of leaked hole values (when any).
    """
    st = result["settings"]
    scales = st["scales"]
    metrics = list(metrics or st.get("metrics") or ("rmse",))
    has_bic = "bicubic" in result["mean"]
    blocks = []
    for metric in metrics:
        caption = (
            f"**{st['dataset']}**, protocol {st['protocol']} ({st['protocol_description']}): mean of per-image "
            f"{_METRIC_NAMES.get(metric, metric)} in {st['units']}, border crop {st['crop']} px, "
            f"{st['n_images']} images"
        )
        extra = " time / image (s) | CPU / image (s) |" + (" worst / bicubic |" if has_bic else "")
        first = metric == metrics[0]
        lines = [
            caption,
            "",
            "| method | " + " | ".join(f"x{s}" for s in scales) + " |" + (extra if first else ""),
            "|---" * (len(scales) + 1 + (extra.count("|") if first else 0)) + "|",
        ]
        for m, by_scale in result["mean"].items():
            cells = []
            for s in scales:
                cell = by_scale[str(s)]
                text = f"{cell[metric]:.3f}"
                if math.isfinite(cell["coverage"]) and cell["coverage"] < 0.9995:
                    text += f" (cov {cell['coverage']:.3f})"
                if cell.get("n_leak"):
                    text += f" (leak {cell['n_leak']})"
                cells.append(text)
            row = f"| {m} | " + " | ".join(cells) + " |"
            if first:
                seconds = _finite_mean([by_scale[str(s)]["time_s"] for s in scales])
                cpu = _finite_mean([by_scale[str(s)].get("cpu_s", math.nan) for s in scales])
                row += f" {seconds:.3f} | {cpu:.3f} |"
                if has_bic:
                    worst = max((by_scale[str(s)]["worst_vs_bicubic"] for s in scales), default=math.nan)
                    row += f" {worst:.3f} |"
            lines.append(row)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def evaluate(
    dataset: str,
    root: str | Path | None,
    scales: Sequence[int] = (4, 8, 16),
    protocol: str | None = "B",
    methods: Sequence[str] | str = ("nearest", "bilinear", "bicubic", "guided"),
    *,
    limit: int | None = None,
    metrics: Sequence[str] = ("rmse",),
    json_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    options: dict[str, dict[str, Any]] | None = None,
    convention: Convention | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Evaluate depth super-resolution methods on a dataset.

    Parameters
    ----------
    dataset : str
        Dataset registry name (:data:`ua3d.depth.datasets.DATASETS`).
    root : str or Path or None
        Dataset folder (None only for ``motorcycle``).
    scales : sequence of int
        Upsampling factors.
    protocol : {"A", "A-start", "B", "area", "given"} or None
        LR generation (:func:`ua3d.depth.protocols.make_lr`); ``"given"``: the dataset's own LR inputs
        (``park2011``). None: ``"given"`` for park2011, ``"area"`` for the real sensor frames
        (:data:`SENSOR_DATASETS`), ``"B"`` otherwise.
    methods : sequence of str or str
        Registered method names (a comma-separated string is accepted).
    limit : int, optional
        Use only the first ``limit`` images (sorted by name).
    metrics : sequence of str
        Metrics printed as tables (``rmse``, ``edge_rmse``, ``mae``, ``delta1``, ...); all are in the JSON.
    json_path : str or Path, optional
        Where to write the full result as JSON (parent folders are created).
    device : str or torch.device
        Device the methods run on.
    options : dict, optional
        Per-method keyword options, e.g. ``{"guided": {"radius": 8}}``.
    convention : Convention, optional
        Override the dataset's scoring convention (:data:`CONVENTIONS`).
    progress : bool
        Show a tqdm progress bar (one step per image and scale).
    verbose : bool
        Print the Markdown table.

    Returns
    -------
    dict
        ``settings``, ``versions``, ``per_image`` (one record per image, scale and method with all metrics of
        :func:`ua3d.depth.metrics.compute_metrics` and ``time_s``), ``mean`` (method -> scale -> metric,
        averaged over images) and ``table`` (Markdown).
    """
    from tqdm.auto import tqdm

    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    names = [m for m in names if m]
    if not names:
        raise ValueError("methods is empty")
    if protocol is None:
        protocol = "given" if dataset == "park2011" else "area" if dataset in SENSOR_DATASETS else "B"
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}")
    if protocol == "given" and dataset != "park2011":
        raise ValueError(f"protocol 'given' needs a dataset that ships LR inputs (park2011), got {dataset!r}")
    known = ("rmse", "mae", "edge_rmse", "delta1", "delta2", "delta3", "coverage")
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if not metrics or any(m not in known for m in metrics):
        raise ValueError(f"metrics must be a non-empty subset of {known}, got {list(metrics)}")
    if not scales or any(isinstance(s, bool) or int(s) != s or s < 1 for s in scales):
        raise ValueError(f"scales must be positive integers, got {list(scales)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    scales = [int(s) for s in scales]
    resolved = {m: get_method(m) for m in names}  # fail early on unknown / missing methods
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset name {dataset!r}; expected one of {', '.join(DATASETS)}")
    conv = convention or CONVENTIONS[dataset]
    samples = load_dataset(dataset, root)[:limit]
    dev = torch.device(device)
    records: list[dict[str, Any]] = []
    with tqdm(total=len(samples) * len(scales), desc=f"{dataset} x{scales}", disable=not progress) as bar:
        for sample in samples:
            records += _evaluate_sample(sample, scales, protocol, resolved, options or {}, conv, dev, bar)
    result = {
        "settings": {
            "dataset": dataset,
            "root": None if root is None else str(root),
            "scales": scales,
            "protocol": protocol,
            "protocol_description": DESCRIPTIONS.get(protocol, "the dataset's own LR inputs and confidence"),
            "metrics": list(metrics),
            "methods": names,
            "options": options or {},
            "n_images": len(samples),
            "limit": limit,
            "device": str(dev),
            **asdict(conv),
            "metric": "mean over images of per-image metrics; GT valid = finite and > 0",
        },
        "versions": _versions(),
        "per_image": records,
        "mean": _summarise(records, names, scales),
    }
    result["table"] = format_table(result)
    if verbose:
        print(result["table"])
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(result), indent=1))
    return result


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------


def _parse_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["guided.radius=8", "jbu.sigma_range=0.1"]`` -> ``{"guided": {"radius": 8}, "jbu": {...}}``."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name):
            raise ValueError(f"--option must look like METHOD.NAME=VALUE, got {item!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        options.setdefault(method, {})[name] = parsed
    return options


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``ua3d eval depth-sr`` to ``parser`` (returned); :func:`run` executes them."""
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="dataset registry name")
    parser.add_argument("--root", default=None, help="dataset folder (not needed for motorcycle)")
    parser.add_argument("--scales", type=int, nargs="+", default=[4, 8, 16], help="upsampling factors")
    parser.add_argument(
        "--protocol",
        choices=EVAL_PROTOCOLS,
        default=None,
        help="LR generation: A = every s-th pixel hr[s-1::s], A-start = hr[::s], B = PIL bicubic "
        "downsampling, area = mean of the valid pixels of each block (sensor-like, with holes), given = the "
        "dataset's own noisy inputs (park2011). Default: given for park2011, area for the real sensor frames "
        "(redwood, tum, sunrgbd, nyu-raw), B otherwise",
    )
    parser.add_argument(
        "--methods",
        default="nearest,bilinear,bicubic,guided",
        help=f"comma-separated, from: {', '.join(available_methods())}",
    )
    parser.add_argument(
        "--metrics",
        default="rmse",
        help="comma-separated metrics printed as tables: rmse, edge_rmse, mae, delta1-3, coverage (all are "
        "in the JSON)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write the full result JSON here")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="keyword option for one method, repeatable (e.g. guided.radius=8, ua3d.consistency=area)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--anyup-checkpoint",
        default=None,
        metavar="PATH",
        help="local AnyUp weights for method anyup (anyup_paper.pth or anyup_multi_backbone.pth from the "
        "wimmerth/anyup GitHub releases; never downloaded); same as --option anyup.checkpoint=PATH",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone argument parser of the ``depth-sr`` evaluation command."""
    parser = argparse.ArgumentParser(
        prog="ua3d eval depth-sr", description="Evaluate guided depth super-resolution methods on a dataset."
    )
    return add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation described by parsed :func:`add_arguments` options; returns 0.

    Raises
    ------
    ValueError
        Bad arguments or data (unknown method, missing checkpoint, bad scales, a folder of the wrong layout).
    ImportError
        A requested method whose implementation cannot be imported.
    """
    options = _parse_options(args.option)
    if args.anyup_checkpoint is not None:
        options.setdefault("anyup", {})["checkpoint"] = str(args.anyup_checkpoint)
    _check_anyup_checkpoint(args.methods, options)
    evaluate(
        args.dataset,
        args.root,
        args.scales,
        args.protocol,
        args.methods,
        limit=args.limit,
        metrics=args.metrics,
        json_path=args.json_path,
        device=args.device,
        options=options,
        progress=not args.no_progress,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point for scripts; returns the process exit code (0 on success, 2 on bad arguments or data)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, ImportError) as err:
        print(f"ua3d: error: {err}", file=sys.stderr)
        return 2
