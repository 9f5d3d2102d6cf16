"""Resume bookkeeping: config hashes, atomic writes, sidecar JSON files.

Rules
-----
* Every output is first written to a temporary file in its own folder (``.<name>.ua3d-tmp-<random><ext>``:
  same file system, same extension so format-by-extension writers work) and then moved into place
  with ``os.replace`` (atomic on POSIX). The sidecar ``<out>/<id>.json`` is written the same way,
  **last**, after every output is in place.
* An item is *done* when its sidecar exists, says ``status: done``, has the same ``config_hash`` as
  the item about to run, and every output it lists exists with the recorded size. Anything else
  (no sidecar, another hash, a missing or truncated output) means the item runs again.
* The config hash covers the task name and version, every resolved option, and the input files'
  paths, sizes and modification times. Engine, workers and threads are recorded but not hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_MARK",
    "atomic_path",
    "config_hash",
    "file_sha256",
    "input_fingerprint",
    "is_done",
    "read_sidecar",
    "remove_stale_temps",
    "versions",
    "write_json_atomic",
]

TMP_MARK = ".ua3d-tmp-"


def tmp_name(final: Path) -> Path:
    """Temporary sibling of ``final``: hidden, unique, same extension (``.x.png.ua3d-tmp-ab12cd.png``)."""
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}{final.suffix}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success move it onto ``final``, on error remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file, then ``os.replace``).

    No fsync: after a power loss a sidecar may be empty or an output short, and both read as not done
    (:func:`is_done` checks the sizes), so the item is redone.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True, default=str)
        fh.write("\n")
    return path


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temporary files left in ``folder`` (recursively) by an interrupted run; returns how many."""
    n = 0
    root = Path(folder)
    if not root.is_dir():
        return 0
    for p in root.rglob(f".*{TMP_MARK}*"):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            p.unlink()
            n += 1
    return n


def input_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns"}`` of an input file (absolute path).

    A folder input (e.g. the per-frame outputs a fusion item consumes) gets ``files`` (count), the total
    ``size`` and the newest ``mtime_ns`` of the files below it (hidden files ignored).
    """
    p = Path(path).resolve()
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
        stats = [f.stat() for f in files]
        return {
            "path": str(p),
            "files": len(files),
            "size": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
        }
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def config_hash(task: str, version: int, options: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> str:
    """SHA-256 (hex, first 16 bytes) of the canonical JSON of the task, its version, options and inputs."""
    blob = json.dumps(
        {"task": task, "version": version, "options": options, "inputs": inputs},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar's content, or None when it is missing or unreadable (a half-written one cannot exist)."""
    try:
        with open(path) as fh:
            d = json.load(fh)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def is_done(sidecar: str | os.PathLike, chash: str, outputs: dict[str, str]) -> bool:
    """True if the item with hash ``chash`` and outputs ``{name: path}`` is complete (module rules)."""
    d = read_sidecar(sidecar)
    if d is None or d.get("status") != "done" or d.get("config_hash") != chash:
        return False
    recorded = d.get("outputs") or {}
    for name, path in outputs.items():
        rec = recorded.get(name)
        if not isinstance(rec, dict):
            return False
        try:
            if os.path.getsize(path) != rec.get("bytes"):
                return False
        except OSError:
            return False
    return True


def versions() -> dict[str, str | None]:
    """Versions of ua3d and the libraries that shape its outputs (recorded in every sidecar)."""
    import numpy
    import torch

    import ua3d

    out: dict[str, str | None] = {
        "ua3d": ua3d.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for mod in ("numba", "cv2"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out
