"""Seeded synthetic RGB-D scenes with exact depth, object ids and known geometry.

A scene is a ground plane (y = 0, world y is up) and a back wall (z = ``WALL_Z``), both
textured, with a few boxes and spheres standing on the ground. Textures are procedural (checkers,
stripes, rings) so they have sharp *texture* edges that are not depth edges, and one object
("camouflage") reuses the wall's (or ground's) texture in world coordinates, so its colour matches
what lies behind it (it is also shaded like that surface) and only depth separates them.

Planes and boxes are ray-cast with Open3D's ``t.geometry.RaycastingScene`` (CPU, exact for flat
faces). Spheres are intersected analytically (a tessellated sphere would be off by up to
``r (1 - cos(pi / n))``) and composited by depth. Rays come from :func:`ua3d.rgbd.camera.pixel_rays`
(integer pixel centres, direction z-component 1 in the camera frame), so the hit parameter is the
z-depth. Open3D's own ``create_rays_pinhole`` would shift pixel centres by half a pixel.

Object ids: 0 = nothing hit (depth 0), 1 = ground, 2 = back wall, 3... = boxes and spheres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ua3d.rgbd.camera import PinholeCamera, look_at, pixel_rays

__all__ = [
    "FAMILIES",
    "GROUND_ID",
    "WALL_ID",
    "SceneLayout",
    "default_camera",
    "make_family_layout",
    "make_family_scene",
    "make_layout",
    "make_scene",
    "render_layout",
    "surface_distance",
]

GROUND_ID = 1
WALL_ID = 2
WALL_Z = -2.5
_EXTENT = 6.0  # half-width of ground and wall, metres


@dataclass
class SceneLayout:
    """Geometry, textures and light of a scene (everything but the camera).

    ``objects`` is a list of dicts with keys ``id``, ``kind`` ("plane", "box", "sphere"),
    ``texture`` (dict) and the geometry:

    * plane: ``normal [3]``, ``offset`` (points p with ``normal . p = offset``), ``corners [4, 3]``
    * box: ``center [3]``, ``half_extents [3]``, ``rotation [3, 3]`` (local -> world)
    * sphere: ``center [3]``, ``radius``

    and ``camouflage`` (True when it copies the wall's or ground's texture, in world coordinates;
    such an object also has ``shade_normal``, the normal of the imitated surface, used for its
    shading so that its colours are those of the background and only depth tells them apart).
    """

    objects: list[dict[str, Any]]
    light: np.ndarray
    ambient: float = 0.45
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- layout sampling
def _palette(
    rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]
) -> list[list[float]]:
    """Two colours of one random hue with different brightness (HSV -> RGB)."""
    import colorsys

    h = rng.uniform(0, 1)
    s = rng.uniform(*sat)
    v1, v2 = rng.uniform(*val), rng.uniform(*val)
    if abs(v1 - v2) < 0.25:
        v2 = v1 - 0.3 if v1 > 0.5 else v1 + 0.3
    return [list(colorsys.hsv_to_rgb(h, s, v1)), list(colorsys.hsv_to_rgb((h + 0.05) % 1, s, v2))]


def _plane(obj_id: int, name: str, corners: np.ndarray, normal: np.ndarray, texture: dict) -> dict[str, Any]:
    return {
        "id": obj_id,
        "name": name,
        "kind": "plane",
        "normal": normal,
        "offset": float(normal @ corners[0]),
        "corners": corners,
        "texture": texture,
        "camouflage": False,
    }


def make_layout(seed: int = 0, n_objects: int = 4, camouflage: bool = True) -> SceneLayout:
    """Sample a scene layout: ground, wall and ``n_objects`` (1..8) boxes/spheres in distinct slots."""
    if not 1 <= n_objects <= 8:
        raise ValueError(f"n_objects must be in 1..8, got {n_objects}")
    rng = np.random.default_rng(seed)
    E, wz = _EXTENT, WALL_Z
    ground_tex = {
        "type": "checker2",
        "axes": (0, 2),
        "size": float(rng.uniform(0.25, 0.4)),
        "colors": _palette(rng, (0.1, 0.35), (0.35, 0.9)),
        "frame": "world",
    }
    wall_tex = {
        "type": "checker2",
        "axes": (0, 1),
        "size": float(rng.uniform(0.3, 0.5)),
        "colors": _palette(rng, (0.15, 0.4), (0.4, 0.9)),
        "frame": "world",
    }
    objects = [
        _plane(
            GROUND_ID,
            "ground",
            np.array([[-E, 0, wz], [E, 0, wz], [E, 0, E], [-E, 0, E]], float),
            np.array([0.0, 1.0, 0.0]),
            ground_tex,
        ),
        _plane(
            WALL_ID,
            "wall",
            np.array([[-E, 0, wz], [E, 0, wz], [E, E, wz], [-E, E, wz]], float),
            np.array([0.0, 0.0, 1.0]),
            wall_tex,
        ),
    ]
    slots = [(x, z) for z in (-1.5, -0.4) for x in (-1.5, -0.5, 0.5, 1.5)]
    chosen = rng.permutation(len(slots))[:n_objects]
    kinds = ["box", "sphere"] + list(rng.choice(["box", "sphere"], size=max(0, n_objects - 2)))
    kinds = [str(k) for k in rng.permutation(kinds[:n_objects])]
    for i, (slot, kind) in enumerate(zip(chosen, kinds)):
        x, z = slots[slot]
        x, z = x + rng.uniform(-0.1, 0.1), z + rng.uniform(-0.1, 0.1)
        obj: dict[str, Any] = {"id": 3 + i, "name": f"{kind}{i}", "kind": kind, "camouflage": False}
        if kind == "box":
            half = np.array([rng.uniform(0.18, 0.34), rng.uniform(0.15, 0.4), rng.uniform(0.18, 0.34)])
            lift = rng.uniform(0.1, 0.3) if rng.uniform() < 0.3 else 0.0  # some boxes float
            yaw = rng.uniform(-0.6, 0.6)
            c, s = np.cos(yaw), np.sin(yaw)
            obj.update(
                center=np.array([x, half[1] + lift, z]),
                half_extents=half,
                rotation=np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            )
            axis = int(rng.integers(0, 3))
            obj["texture"] = {
                "type": "stripes",
                "axis": axis,
                "count": int(rng.integers(3, 7)),
                "half": float(half[axis]),
                "colors": _palette(rng, (0.5, 0.9), (0.3, 1.0)),
                "frame": "local",
            }
        else:
            r = rng.uniform(0.2, 0.34)
            lift = rng.uniform(0.1, 0.3) if rng.uniform() < 0.3 else 0.0
            obj.update(center=np.array([x, r + lift, z]), radius=float(r))
            obj["texture"] = {
                "type": "rings",
                "count": int(rng.integers(3, 7)),
                "radius": float(r),
                "colors": _palette(rng, (0.5, 0.9), (0.3, 1.0)),
                "frame": "local",
            }
        objects.append(obj)
    if camouflage:
        first = objects[2]
        first.update(texture=wall_tex, camouflage=True, shade_normal=objects[1]["normal"])
        if n_objects >= 3:
            objects[3].update(texture=ground_tex, camouflage=True, shade_normal=objects[0]["normal"])
    light = np.array([rng.uniform(-0.5, 0.5), 1.0, rng.uniform(0.5, 1.0)])
    return SceneLayout(objects=objects, light=light / np.linalg.norm(light), seed=seed)


def default_camera(
    width: int = 320, height: int = 240, seed: int = 0, focal: float | None = None
) -> PinholeCamera:
    """Camera looking at the scene centre from the front (pose jittered by ``seed``).

    ``focal`` defaults to ``525 * width / 640`` (PrimeSense-like field of view); the principal
    point is the image centre ``((W - 1) / 2, (H - 1) / 2)``.
    """
    rng = np.random.default_rng([seed, 7])
    eye = np.array([rng.uniform(-0.3, 0.3), rng.uniform(1.0, 1.3), rng.uniform(1.6, 2.0)])
    target = np.array([rng.uniform(-0.2, 0.2), 0.3, -1.0])
    f = 525.0 * width / 640.0 if focal is None else focal
    return PinholeCamera(f, f, (width - 1) / 2, (height - 1) / 2, width, height, look_at(eye, target))


# ---------------------------------------------------------------------- rendering
def _box_mesh(obj: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], float) * 2 - 1
    verts = (corners * obj["half_extents"]) @ obj["rotation"].T + obj["center"]
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tris = [t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))]
    return verts, np.array(tris)


def _mesh_of(obj: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if obj["kind"] == "plane":
        return obj["corners"], np.array([[0, 1, 2], [0, 2, 3]])
    return _box_mesh(obj)


def _raycast_meshes(objects: list[dict], origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Ray-cast planes and boxes; returns t [N] (inf = miss), ids [N], normals [N, 3]."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    gid_to_obj: dict[int, int] = {}
    for obj in objects:
        if obj["kind"] == "sphere":
            continue
        v, t = _mesh_of(obj)
        mesh = o3d.t.geometry.TriangleMesh()
        mesh.vertex.positions = o3d.core.Tensor(v.astype(np.float32))
        mesh.triangle.indices = o3d.core.Tensor(t.astype(np.int32))
        gid_to_obj[int(scene.add_triangles(mesh))] = obj["id"]
    rays = np.concatenate([origins, dirs], axis=1).astype(np.float32)
    ans = scene.cast_rays(o3d.core.Tensor(rays))
    t = ans["t_hit"].numpy().astype(np.float64)
    gids = ans["geometry_ids"].numpy().astype(np.int64)
    hit = np.isfinite(t)
    lut = np.zeros(max(gid_to_obj) + 1, np.int32)
    for g, i in gid_to_obj.items():
        lut[g] = i
    ids = np.where(hit, lut[np.where(hit, gids, 0)], 0)
    return t, ids, ans["primitive_normals"].numpy().astype(np.float64)


def _intersect_sphere(origins: np.ndarray, dirs: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Nearest positive ray parameter of a sphere hit, inf on a miss. origins, dirs [N, 3]."""
    oc = origins - center
    a = np.einsum("ij,ij->i", dirs, dirs)
    b = np.einsum("ij,ij->i", dirs, oc)
    c = np.einsum("ij,ij->i", oc, oc) - radius**2
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def _texture(tex: dict[str, Any], q: np.ndarray) -> np.ndarray:
    """Albedo [N, 3] of texture ``tex`` at texture-frame points q [N, 3]."""
    if tex["type"] == "checker2":
        a, b = tex["axes"]
        k = np.floor(q[:, a] / tex["size"] + 0.25).astype(np.int64) + np.floor(
            q[:, b] / tex["size"] + 0.25
        ).astype(np.int64)
    elif tex["type"] == "stripes":
        w = 2 * tex["half"] / tex["count"]
        k = np.floor((q[:, tex["axis"]] + tex["half"]) / w + 0.5).astype(np.int64)
    elif tex["type"] == "rings":
        w = 2 * tex["radius"] / tex["count"]
        k = np.floor((q[:, 1] + tex["radius"]) / w + 0.5).astype(np.int64)
    elif tex["type"] == "solid":
        return np.broadcast_to(np.asarray(tex["colors"][0], dtype=np.float64), (q.shape[0], 3)).copy()
    elif tex["type"] == "checker3":
        k = sum(np.floor(q[:, a] / tex["size"] + 0.25).astype(np.int64) for a in range(3))
    elif tex["type"] == "sines":  # smooth blend of the two colours: shading-like, no texture edge
        f = np.asarray(tex["freq"], dtype=np.float64)
        t = 0.5 + 0.5 * np.sin(q @ f + tex["phase"])
        c = np.asarray(tex["colors"], dtype=np.float64)
        return c[0][None] * (1 - t[:, None]) + c[1][None] * t[:, None]
    else:
        raise ValueError(f"unknown texture type {tex['type']!r}")
    colors = np.asarray(tex["colors"], dtype=np.float64)
    return colors[k % len(colors)]


def _to_local(obj: dict[str, Any], p: np.ndarray) -> np.ndarray:
    if obj["kind"] == "box":
        return (p - obj["center"]) @ obj["rotation"]
    if obj["kind"] == "sphere":
        return p - obj["center"]
    return p


def render_layout(
    layout: SceneLayout,
    camera: PinholeCamera,
    holes: int = 0,
    noise_std: float = 0.0,
    seed: int | None = None,
) -> dict[str, Any]:
    """Render a layout from ``camera`` (its pose is camera-to-world; None = identity).

    Parameters
    ----------
    layout : SceneLayout
    camera : PinholeCamera
    holes : int
        Number of random elliptic dropout blobs set to 0 in ``depth`` (not in ``depth_gt``).
    noise_std : float
        Std of Gaussian noise added to ``rgb`` (then clipped to [0, 1]).
    seed : int, optional
        Seed of holes and noise (default: ``layout.seed``).

    Returns
    -------
    dict with numpy arrays ``rgb [H, W, 3]`` float32 in [0, 1], ``depth [H, W]`` float32 metric
    z-depth (0 = hole), ``depth_gt [H, W]`` (no dropout), ``valid [H, W]`` bool (depth > 0),
    ``ids [H, W]`` int32, ``normals [H, W, 3]`` float32 (world frame, facing the camera; 0 on a
    miss), plus ``camera`` and ``objects`` (``layout.objects``).
    """
    H, W = camera.height, camera.width
    o_t, d_t = pixel_rays(camera, frame="world", dtype=torch.float64)
    origins, dirs = o_t.reshape(-1, 3).numpy(), d_t.reshape(-1, 3).numpy()
    t, ids, normals = _raycast_meshes(layout.objects, origins, dirs)
    for obj in layout.objects:
        if obj["kind"] != "sphere":
            continue
        ts = _intersect_sphere(origins, dirs, obj["center"], obj["radius"])
        closer = ts < t
        t, ids = np.where(closer, ts, t), np.where(closer, obj["id"], ids)
        pts = origins[closer] + ts[closer, None] * dirs[closer]
        normals[closer] = (pts - obj["center"]) / obj["radius"]
    hit = np.isfinite(t)
    t = np.where(hit, t, 0.0)
    pts = origins + t[:, None] * dirs
    flip = np.einsum("ij,ij->i", normals, dirs) > 0
    normals = np.where(flip[:, None], -normals, normals) * hit[:, None]

    albedo = np.zeros((H * W, 3))
    for obj in layout.objects:
        sel = ids == obj["id"]
        if sel.any():
            q = pts[sel] if obj["texture"]["frame"] == "world" else _to_local(obj, pts[sel])
            albedo[sel] = _texture(obj["texture"], q)
    shade_normals = normals.copy()
    for obj in layout.objects:  # camouflaged objects are shaded like the surface they imitate
        if obj.get("shade_normal") is not None:
            shade_normals[ids == obj["id"]] = obj["shade_normal"]
    shade = layout.ambient + (1 - layout.ambient) * np.clip(shade_normals @ layout.light, 0.0, 1.0)
    rgb = (albedo * shade[:, None]).reshape(H, W, 3)

    rng = np.random.default_rng([layout.seed if seed is None else seed, 11])
    if noise_std > 0:
        rgb = rgb + rng.normal(0.0, noise_std, rgb.shape)
    depth_gt = t.reshape(H, W).astype(np.float32)
    depth = depth_gt * ~_dropout_mask(rng, H, W, holes)
    return {
        "rgb": np.clip(rgb, 0.0, 1.0).astype(np.float32),
        "depth": depth.astype(np.float32),
        "depth_gt": depth_gt,
        "valid": depth > 0,
        "ids": ids.reshape(H, W).astype(np.int32),
        "normals": normals.reshape(H, W, 3).astype(np.float32),
        "camera": camera,
        "objects": layout.objects,
    }


def _dropout_mask(rng: np.random.Generator, H: int, W: int, holes: int) -> np.ndarray:
    """Union of ``holes`` random axis-aligned ellipses, bool [H, W]."""
    if holes < 0:
        raise ValueError(f"holes must be >= 0, got {holes}")
    mask = np.zeros((H, W), bool)
    v, u = np.mgrid[0:H, 0:W]
    for _ in range(holes):
        cu, cv = rng.uniform(0, W), rng.uniform(0, H)
        ru, rv = rng.uniform(1.5, max(2.0, 0.04 * W), size=2)
        mask |= ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0
    return mask


def make_scene(
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    n_objects: int = 4,
    holes: int = 0,
    noise_std: float = 0.0,
    camouflage: bool = True,
    focal: float | None = None,
) -> dict[str, Any]:
    """Seeded synthetic RGB-D frame: :func:`make_layout` seen by :func:`default_camera`.

    Same seed and arguments give bit-identical outputs. See :func:`render_layout` for the keys;
    ``layout`` (the :class:`SceneLayout`) is added.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    layout = make_layout(seed, n_objects=n_objects, camouflage=camouflage)
    scene = render_layout(
        layout, default_camera(width, height, seed, focal), holes=holes, noise_std=noise_std
    )
    scene["layout"] = layout
    return scene


def surface_distance(points: np.ndarray, obj: dict[str, Any]) -> np.ndarray:
    """Unsigned distance [N] of world points [N, 3] to the surface of a layout object."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must have shape [N, 3], got {p.shape}")
    if obj["kind"] == "plane":
        return np.abs(p @ obj["normal"] - obj["offset"])
    if obj["kind"] == "sphere":
        return np.abs(np.linalg.norm(p - obj["center"], axis=1) - obj["radius"])
    q = np.abs(_to_local(obj, p)) - obj["half_extents"]  # box signed distance
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
    inside = np.minimum(q.max(axis=1), 0.0)
    return np.abs(outside + inside)


# ---------------------------------------------------------------------- scene families
#: scene families of the label-transfer benchmark (:mod:`ua3d.eval.transfer`)
FAMILIES = ("textured", "contact", "thin", "camouflage", "holes")
_TEXTURE_TYPES = ("solid", "stripes", "checker3", "sines", "rings")


def _random_texture(rng: np.random.Generator, obj: dict[str, Any]) -> dict[str, Any]:
    """A random procedural texture for a box or sphere (local frame), random albedo."""
    kind = str(rng.choice(_TEXTURE_TYPES))
    colors = _palette(rng, (0.0, 0.9), (0.15, 1.0))
    size = float(obj["radius"]) if obj["kind"] == "sphere" else float(np.max(obj["half_extents"]))
    if kind == "stripes" and obj["kind"] == "box":
        axis = int(rng.integers(0, 3))
        return {
            "type": "stripes",
            "axis": axis,
            "count": int(rng.integers(2, 7)),
            "half": float(obj["half_extents"][axis]),
            "colors": colors,
            "frame": "local",
        }
    if kind in ("stripes", "rings"):
        return {
            "type": "rings",
            "count": int(rng.integers(2, 7)),
            "radius": size,
            "colors": colors,
            "frame": "local",
        }
    if kind == "checker3":
        return {
            "type": "checker3",
            "size": size * float(rng.uniform(0.3, 0.7)),
            "colors": colors,
            "frame": "local",
        }
    if kind == "sines":
        f = rng.normal(0, 1, 3)
        f = f / np.linalg.norm(f) * float(rng.uniform(2.0, 6.0)) / size
        return {
            "type": "sines",
            "freq": f.tolist(),
            "phase": float(rng.uniform(0, 2 * np.pi)),
            "colors": colors,
            "frame": "local",
        }
    return {"type": "solid", "colors": colors, "frame": "local"}


def _rest_on_floor(obj: dict[str, Any]) -> None:
    """Move a box or sphere down (or up) so that it touches the ground plane y = 0."""
    c = np.array(obj["center"], dtype=np.float64)
    c[1] = (
        obj["radius"] if obj["kind"] == "sphere" else float(np.abs(obj["rotation"][1]) @ obj["half_extents"])
    )
    obj["center"] = c


def make_family_layout(family: str, seed: int = 0) -> SceneLayout:
    """A layout of one benchmark family (seeded; the same ``(family, seed)`` gives the same scene).

    * ``"textured"``: 3-6 boxes/spheres with random albedo and a random procedural texture each
      (solid, stripes, 3D checker, smooth sines, rings), shaded, some floating.
    * ``"contact"``: as textured, every object resting on the floor, the floor's texture drawn from
      the objects' palette (contact edges are weak in colour).
    * ``"thin"``: as contact plus 3-5 thin poles (2-6 cm thick, 0.4-1.2 m tall).
    * ``"camouflage"``: :func:`make_layout` with camouflage (objects wearing the wall's or the
      ground's texture and shading: same colour, different depth).
    * ``"holes"``: as textured; :func:`make_family_scene` adds depth dropout.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    rng = np.random.default_rng([int(seed), FAMILIES.index(family), 101])
    n = int(rng.integers(3, 7))
    if family == "camouflage":
        layout = make_layout(int(seed), n_objects=n, camouflage=True)
        layout.extras["family"] = family
        return layout
    layout = make_layout(int(seed), n_objects=n, camouflage=False)
    for obj in layout.objects[2:]:
        obj["texture"] = _random_texture(rng, obj)
        if family in ("contact", "thin"):
            _rest_on_floor(obj)
    if family in ("contact", "thin"):
        layout.objects[0]["texture"] = dict(
            layout.objects[0]["texture"],
            colors=[list(layout.objects[2 + i % n]["texture"]["colors"][0]) for i in range(2)],
        )
    if family == "thin":
        next_id = 3 + n
        for _ in range(int(rng.integers(3, 6))):
            t = float(rng.uniform(0.01, 0.03))
            tall = float(rng.uniform(0.2, 0.6))
            yaw = float(rng.uniform(-0.6, 0.6))
            c, s = np.cos(yaw), np.sin(yaw)
            obj: dict[str, Any] = {
                "id": next_id,
                "name": f"pole{next_id}",
                "kind": "box",
                "camouflage": False,
                "center": np.array([rng.uniform(-1.8, 1.8), tall, rng.uniform(-2.0, 0.2)]),
                "half_extents": np.array([t, tall, t]),
                "rotation": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            }
            obj["texture"] = {
                "type": "solid",
                "colors": _palette(rng, (0.0, 0.9), (0.15, 1.0)),
                "frame": "local",
            }
            layout.objects.append(obj)
            next_id += 1
    layout.extras["family"] = family
    return layout


def make_family_scene(
    family: str, seed: int = 0, width: int = 320, height: int = 240, holes: int | None = None
) -> dict[str, Any]:
    """Seeded RGB-D frame of a benchmark family (see :func:`make_family_layout`); keys as
    :func:`render_layout` plus ``layout`` and ``family``. ``holes`` defaults to 8 dropout blobs for
    the ``"holes"`` family and 0 otherwise."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    layout = make_family_layout(family, seed)
    n_holes = (8 if family == "holes" else 0) if holes is None else holes
    scene = render_layout(layout, default_camera(width, height, seed), holes=n_holes)
    scene["layout"] = layout
    scene["family"] = family
    return scene
