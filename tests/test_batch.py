"""``ua3d.batch``: resume after a kill, per-item failures, config hashing, local vs Ray parity (real Ray)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ua3d.batch import Item, discover, frame_outputs, read_manifest, run
from ua3d.batch.store import TMP_MARK, is_done, read_sidecar
from ua3d.cli import main
from ua3d.io.rgbd import read_depth, write_color, write_depth, write_intrinsics, write_trajectory_log
from ua3d.rgbd.camera import PinholeCamera

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 6
H, W, S = 48, 64, 4  # HR size and scale: LR 12 x 16


def _frame(i: int, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    """A small RGB-D frame: a tilted plane (metres) with a box in front; stripes that are not depth edges."""
    i = i % 4  # steeper planes make the depth SR overshoot below 0 (a depth-sr matter, not a batch one)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = 2.0 + 0.01 * yy + 0.002 * i * xx
    box = (np.abs(xx - w * (0.3 + 0.07 * i)) < w * 0.15) & (np.abs(yy - h * 0.5) < h * 0.25)
    depth[box] = 1.2
    rgb = np.stack([np.where(box, 200, 60), (xx * (3 + i)) % 255, (yy * 5) % 255], -1).astype(np.uint8)
    return rgb, depth


def _make_dataset(root: Path, n: int, h: int = H, w: int = W) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, depth = _frame(i, h, w)
        write_color(root / f"f{i:02d}_color.png", rgb)
        write_depth(root / f"f{i:02d}_gt.png", depth)
        write_depth(root / f"f{i:02d}_depth.png", depth[S - 1 :: S, S - 1 :: S])
        feats = np.random.default_rng(i).standard_normal((3, h // S, w // S)).astype(np.float32)
        np.save(root / f"f{i:02d}_feat.npy", feats)
    write_intrinsics(root / "K.json", PinholeCamera(60.0, 60.0, (w - 1) / 2, (h - 1) / 2, w, h))
    return root


def _globs(data: Path, gt: bool = False) -> dict[str, str]:
    g = {"rgb": str(data / "*_color.png"), "depth": str(data / "*_depth.png")}
    if gt:
        g["gt"] = str(data / "*_gt.png")
    return g


def _bytes(out: Path, ids, ext: str = ".png") -> dict[str, bytes]:
    return {i: (out / f"{i}{ext}").read_bytes() for i in ids}


IDS = [f"f{i:02d}" for i in range(N_ITEMS)]
OPTS = {"steps": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("batch") / "data", N_ITEMS)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted in-process run (one thread): the outputs every other run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref")
    s = run("depth-sr", _globs(data, gt=True), out=out, workers=0, threads=1, options=OPTS)
    assert s.ok and sorted(s.done) == IDS
    return out


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed (pip install 'ua3d[ray]'): Ray engine tests skipped"
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------------------------------ items
def test_globs_pair_files_by_their_wildcard_key(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "rgb" / sub).mkdir(parents=True)
        (tmp_path / "rgb" / sub / "x_color.png").write_bytes(b"1")
        (tmp_path / "lr").mkdir(exist_ok=True)
        (tmp_path / "lr" / f"{sub}_x.png").write_bytes(b"1")
    (tmp_path / "rgb" / "a" / ".hidden_color.png").write_bytes(b"1")
    items = discover(
        {
            "rgb": str(tmp_path / "rgb/*/*_color.png"),
            "depth": str(tmp_path / "lr/*_*.png"),
            "intrinsics": str(tmp_path / "K.json"),
        }
    )
    assert [it.id for it in items] == ["a/x", "b/x"]
    assert items[0].inputs["depth"] == str(tmp_path / "lr" / "a_x.png")
    assert items[1].inputs["intrinsics"] == str(tmp_path / "K.json")  # no wildcard: shared by every item
    with pytest.raises(ValueError, match="matches no file"):
        discover({"rgb": str(tmp_path / "nothing/*.png")})
    with pytest.raises(ValueError, match="no input glob"):
        discover({"rgb": str(tmp_path / "K.json")})


def test_manifest_csv_and_jsonl_resolve_paths_and_options(tmp_path):
    (tmp_path / "m.csv").write_text("id,rgb,depth,steps\na,c/a.png,d/a.png,3\nb,/abs/b.png,d/b.png,\n")
    items = read_manifest(tmp_path / "m.csv", ("rgb", "depth", "gt"))
    assert items[0] == Item(
        "a",
        {"rgb": str(tmp_path / "c/a.png"), "depth": str(tmp_path / "d/a.png")},
        {"steps": "3"},
        f"{tmp_path / 'm.csv'}:2",
    )
    assert items[1].inputs["rgb"] == "/abs/b.png" and items[1].options == {}  # empty cell: unset
    (tmp_path / "m.jsonl").write_text(
        '{"rgb": "x.png", "depth": "y.png", "options": {"fill_holes": true}}\n\n{"id": "x", "rgb": "z.png"}\n'
    )
    with pytest.raises(ValueError, match=r"m.jsonl:3: duplicate item id 'x'"):
        read_manifest(tmp_path / "m.jsonl", ("rgb", "depth"))
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        read_manifest(tmp_path / "bad.jsonl", ("rgb",))


# ------------------------------------------------------------------------------------------ resume
def test_rerun_skips_done_items_and_force_redoes_them(data, reference, tmp_path):
    threads_before = torch.get_num_threads()
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    s = run("depth-sr", _globs(data, gt=True), out=out, workers=0, threads=1, options=OPTS)
    assert s.ok and s.done == [] and sorted(s.skipped) == IDS
    s = run("depth-sr", _globs(data, gt=True), out=out, workers=0, threads=1, options=OPTS, force=True)
    assert sorted(s.done) == IDS and _bytes(out, IDS) == _bytes(reference, IDS)
    side = read_sidecar(out / "f00.json")
    pred, gt = read_depth(out / "f00.png"), read_depth(data / "f00_gt.png")
    rmse = float(np.sqrt(np.mean((pred - gt) ** 2)))  # from the written 16-bit file: within its 1 mm steps
    assert torch.get_num_threads() == threads_before  # in-process runs restore the caller's threads
    assert side["metrics"]["rmse"] == pytest.approx(rmse, abs=1e-3) and side["inputs"]["gt"]["path"].endswith(
        "f00_gt.png"
    )
    assert set(side["timings"]) == {"compute_s", "task_s", "total_s", "cpu_s"} and side["versions"]["ua3d"]


def test_config_change_invalidates_the_sidecar(data, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = read_sidecar(out / "f00.json")["config_hash"]
    dry = run("depth-sr", _globs(data, gt=True), out=out, workers=0, options={"steps": 3}, dry_run=True)
    assert sorted(dry.planned) == IDS and dry.skipped == []
    assert read_sidecar(out / "f00.json")["config_hash"] == before  # a dry run writes nothing
    s = run("depth-sr", _globs(data, gt=True), out=out, workers=0, threads=1, options={"steps": 3})
    assert sorted(s.done) == IDS
    after = read_sidecar(out / "f00.json")
    assert after["config_hash"] != before and after["options"]["steps"] == 3
    # dropping the ground truth changes the inputs, hence the hash, too
    assert (
        sorted(run("depth-sr", _globs(data), out=out, workers=0, options={"steps": 3}, dry_run=True).planned)
        == IDS
    )


def test_half_written_outputs_are_never_taken_as_done(data, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    side = read_sidecar(out / "f01.json")
    assert is_done(out / "f01.json", side["config_hash"], {"depth": str(out / "f01.png")})
    full = (out / "f01.png").read_bytes()
    (out / "f01.png").write_bytes(full[: len(full) // 2])  # truncated output under a valid sidecar
    (out / "f02.json").unlink()  # output without a sidecar (killed between the two renames)
    (out / f".f03.png{TMP_MARK}dead.png").write_bytes(b"half")  # a temp file of a killed worker
    s = run("depth-sr", _globs(data, gt=True), out=out, workers=0, threads=1, options=OPTS)
    assert sorted(s.done) == ["f01", "f02"] and len(s.skipped) == N_ITEMS - 2
    assert _bytes(out, IDS) == _bytes(reference, IDS)
    assert not list(out.glob(f".*{TMP_MARK}*"))


def _settled_sidecars(out: Path) -> set[str]:
    """Item ids with a sidecar, once no new one appeared for 1.5 s: a worker being stopped (Ray kills them
    asynchronously) may still commit the item it was writing; that item then counts as done before."""
    seen, since = None, time.time()
    while time.time() - since < 1.5:
        now = {p.stem for p in out.glob("*.json") if not p.name.startswith("_")}
        if now != seen:
            seen, since = now, time.time()
        time.sleep(0.1)
    return seen


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_sigterm_mid_run_then_rerun_does_each_item_once(engine, tmp_path, request):
    if engine == "ray":
        request.getfixturevalue(
            "ray_local"
        )  # the rerun uses the module's Ray instance; the killed run its own
    n = 16
    data = _make_dataset(tmp_path / "data", n, h=96, w=128)  # bigger frames: the run lasts a few seconds
    ref = tmp_path / "ref"
    s = run("depth-sr", _globs(data), out=ref, workers=0, threads=1, options=OPTS)
    ids = sorted(s.done)
    assert len(ids) == n
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "ua3d.cli",
        "batch",
        "depth-sr",
        "--rgb",
        str(data / "*_color.png"),
        "--depth",
        str(data / "*_depth.png"),
        "--out",
        str(out),
        "--workers",
        "1",
        "--threads",
        "1",
        "--steps",
        "2",
        "--engine",
        engine,
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.json"))) < 2:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 143, proc.communicate()
    done_before = _settled_sidecars(out)
    sides_before = {i: (out / f"{i}.json").read_bytes() for i in done_before}
    assert 2 <= len(done_before) < n, "the kill came too late to test a resume"
    s = run("depth-sr", _globs(data), out=out, engine=engine, workers=1, threads=1, options=OPTS)
    assert s.ok
    assert set(s.skipped) == done_before  # what the killed run committed is kept, not redone ...
    assert set(s.done) == set(ids) - done_before  # ... and everything else is done exactly once
    assert {i: (out / f"{i}.json").read_bytes() for i in done_before} == sides_before
    assert _bytes(out, ids) == _bytes(ref, ids)  # bit-identical to the uninterrupted run
    assert not list(out.glob(f".*{TMP_MARK}*"))


# ------------------------------------------------------------------------------------------ failures
def test_corrupted_and_mismatched_frames_fail_alone(data, reference, tmp_path, capsys):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    (bad / "f02_color.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # corrupted PNG
    rgb, _ = _frame(4, H // 8, W // 8)  # a colour image smaller than its LR depth: mismatched frame
    write_color(bad / "f04_color.png", rgb)
    (bad / "f05_depth.png").unlink()  # a frame without depth
    out = tmp_path / "out"
    (out / "f02.png").parent.mkdir(parents=True)
    (out / "f02.png").write_bytes(b"old result")  # already written: a failure must not touch it
    rc = main(
        [
            "batch",
            "depth-sr",
            "--rgb",
            str(bad / "*_color.png"),
            "--depth",
            str(bad / "*_depth.png"),
            "--out",
            str(out),
            "--workers",
            "2",
            "--steps",
            "2",
            "--quiet",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    summary = json.loads((out / "_batch_summary.json").read_text())
    failed = {f["id"]: f for f in summary["failed"]}
    assert sorted(failed) == ["f02", "f04", "f05"] and sorted(summary["done"]) == ["f00", "f01", "f03"]
    assert (
        failed["f02"]["path"] == str(bad / "f02_color.png")
        and "could not read colour image" in failed["f02"]["error"]
    )
    assert (
        failed["f04"]["path"].endswith("f04_color.png") and "smaller than depth_lr" in failed["f04"]["error"]
    )
    assert "no depth input" in failed["f05"]["error"]
    assert f"FAILED f02: {bad / 'f02_color.png'}" in err
    assert (out / "f02.png").read_bytes() == b"old result" and not (out / "f02.json").exists()
    assert _bytes(out, ["f00", "f01", "f03"]) == _bytes(reference, ["f00", "f01", "f03"])


def test_bad_per_item_option_fails_that_item_only(data, tmp_path):
    rows = [
        {"id": "a", "rgb": str(data / "f00_color.png"), "depth": str(data / "f00_depth.png"), "steps": "two"},
        {"id": "b", "rgb": str(data / "f01_color.png"), "depth": str(data / "f01_depth.png"), "colour": 1},
        {"id": "c", "rgb": str(data / "f02_color.png"), "depth": str(data / "f02_depth.png"), "steps": 1},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run("depth-sr", tmp_path / "m.jsonl", out=tmp_path / "out", workers=0)
    assert s.done == ["c"] and not s.ok
    errors = {f["id"]: f["error"] for f in s.failed}
    assert errors == {
        "a": "option 'steps' must be int, got 'two'",
        "b": "unknown option 'colour' for task 'depth-sr'; known: depth_scale, fill_holes, steps, "
        "preset, scale, seed, device",
    }
    assert read_sidecar(tmp_path / "out" / "c.json")["options"]["steps"] == 1


# ------------------------------------------------------------------------------------------ engines
def test_local_pool_and_ray_give_identical_outputs(data, reference, tmp_path, ray_local):
    local = run("depth-sr", _globs(data, gt=True), out=tmp_path / "local", workers=2, options=OPTS)
    ray_run = run(
        "depth-sr", _globs(data, gt=True), out=tmp_path / "ray", engine="ray", workers=2, options=OPTS
    )
    assert local.ok and ray_run.ok and sorted(local.done) == sorted(ray_run.done) == IDS
    assert local.threads == ray_run.threads == 1  # 2 workers x 1 thread on a 2-core budget
    assert _bytes(tmp_path / "local", IDS) == _bytes(tmp_path / "ray", IDS) == _bytes(reference, IDS)
    sides = [read_sidecar(tmp_path / e / "f00.json") for e in ("local", "ray")]
    assert [d["engine"] for d in sides] == ["local", "ray"] and sides[0]["config_hash"] == sides[1][
        "config_hash"
    ]
    assert ray_local.is_initialized()  # run() used the test's instance and left it running
    again = run(
        "depth-sr", _globs(data, gt=True), out=tmp_path / "local", engine="ray", workers=2, options=OPTS
    )
    assert sorted(again.skipped) == IDS  # same resume rules whichever engine wrote the outputs


# ------------------------------------------------------------------------------------------ other tasks
def test_upsample_and_lift_write_their_outputs(data, tmp_path):
    s = run(
        "upsample",
        {"image": str(data / "f0[01]_color.png"), "signal": str(data / "f0[01]_feat.npy")},
        out=tmp_path / "up",
        workers=0,
        options={"steps": 2},
    )
    assert s.ok and sorted(s.done) == ["0", "1"]  # the key is what the wildcard matched
    hr = np.load(tmp_path / "up" / "0.npy")
    lr = np.load(data / "f00_feat.npy")
    assert hr.shape == (3, H, W) and hr.min() >= lr.min() - 1e-5 and hr.max() <= lr.max() + 1e-5
    s = run(
        "lift",
        {
            "rgb": str(data / "f0[0]_color.png"),
            "depth": str(data / "f0[0]_gt.png"),
            "features": str(data / "f0[0]_feat.npy"),
        },
        shared_inputs={"intrinsics": str(data / "K.json")},
        out=tmp_path / "lift",
        workers=0,
        options={"steps": 2, "bins": 4},
    )
    assert s.ok, s.failed
    item = s.done[0]
    with np.load(tmp_path / "lift" / item / "volume.npz") as z:
        assert z["volume"].shape == (3, 4, H, W)
    assert (tmp_path / "lift" / item / "points.npz").is_file()


def test_fuse_frames_applies_each_frame_pose(data, tmp_path):
    t = np.eye(4)
    t[:3, 3] = [1.0, -2.0, 0.5]
    traj = tmp_path / "traj.log"
    traj.write_text(
        "".join(
            f"{i} {i} {i + 1}\n"
            + "\n".join(" ".join(map(str, r)) for r in (np.eye(4) if i == 0 else t))
            + "\n"
            for i in range(2)
        )
    )
    globs = {
        "rgb": str(data / "f0[0]_color.png"),
        "depth": str(data / "f0[0]_gt.png"),
        "features": str(data / "f0[0]_feat.npy"),
        "intrinsics": str(data / "K.json"),
    }
    # the same frame twice, as trajectory entries 0 (identity) and 1 (translation t)
    items = [
        Item(n, {k: discover(globs)[0].inputs[k] for k in globs}, {"frame": i})
        for i, n in enumerate(["a", "b"])
    ]
    s = run(
        "fuse-frames",
        items,
        out=tmp_path / "f",
        workers=0,
        shared_inputs={"trajectory": str(traj)},
        options={"steps": 2},
    )
    assert s.ok, s.failed
    frames = frame_outputs(tmp_path / "f")
    assert [f["id"] for f in frames] == ["a", "b"] and frames[1]["pose"] == t.tolist()
    a, b = (np.load(f["points"]) for f in frames)
    assert (
        int(a["world_frame"]) == 1 and a["positions"].shape[0] == (read_depth(data / "f00_gt.png") > 0).sum()
    )
    np.testing.assert_allclose(b["positions"], a["positions"] + t[:3, 3], atol=1e-5)
    np.testing.assert_array_equal(a["features"], b["features"])


def count_points(inputs, opts, outputs):
    """A reduction task over one sequence's fuse-frames folder (how a real fuse task plugs in)."""
    frames = frame_outputs(inputs["frames"])
    n = sum(int(np.load(f["points"])["positions"].shape[0]) for f in frames)
    Path(outputs["total"]).write_text(f"{len(frames)} {n}\n")
    return {"metrics": {"frames": len(frames), "points": n}}


def test_a_registered_task_consumes_a_folder_of_frames(data, tmp_path):
    from ua3d.batch import Option, Task, register_task

    task = register_task(
        Task("count-points", ("frames",), (Option("seed", int, 0),), {"total": "{id}.txt"}, count_points),
        replace=True,
    )
    frames = tmp_path / "frames"
    globs = {
        "rgb": str(data / "f0[01]_color.png"),
        "depth": str(data / "f0[01]_gt.png"),
        "features": str(data / "f0[01]_feat.npy"),
        "intrinsics": str(data / "K.json"),
    }
    write_trajectory_log(tmp_path / "traj.log", np.stack([np.eye(4)] * 2))
    shared = {"trajectory": str(tmp_path / "traj.log")}
    assert run("fuse-frames", globs, out=frames, workers=0, options={"steps": 1}, shared_inputs=shared).ok
    seq = [Item("seq", {"frames": str(frames)})]
    s = run(task, seq, out=tmp_path / "fused", workers=0)
    assert s.ok and (tmp_path / "fused" / "seq.txt").read_text() == f"2 {2 * H * W}\n"
    assert run(task, seq, out=tmp_path / "fused", workers=0).skipped == ["seq"]
    (frames / "0.npz").unlink()  # a frame went missing from the folder: the fused item is stale
    assert run(task, seq, out=tmp_path / "fused", workers=0).done == ["seq"]


def test_cli_dry_run_lists_items_and_writes_nothing(data, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "f03.json").unlink()
    before = sorted(p.name for p in out.iterdir())
    rc = main(
        [
            "batch",
            "depth-sr",
            "--rgb",
            str(data / "*_color.png"),
            "--depth",
            str(data / "*_depth.png"),
            "--gt",
            str(data / "*_gt.png"),
            "--out",
            str(out),
            "--steps",
            "2",
            "--dry-run",
            "--quiet",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert "run   f03" in lines and "skip  f00 (done)" in lines and len(lines) == N_ITEMS
    assert sorted(p.name for p in out.iterdir()) == before
    assert main(["batch", "depth-sr", "--out", str(out), "--quiet"]) == 2  # no items given: one-line error
    assert "ua3d: error: give the items" in capsys.readouterr().err
