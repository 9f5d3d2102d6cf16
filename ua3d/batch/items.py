"""Batch items: what one unit of work reads, and the two ways to list them (folder globs, manifest).

An :class:`Item` is an id, its input files (one path per input kind) and its per-item options.

Folder mode (:func:`discover`)
    One glob per input kind, e.g. ``{"rgb": "scenes/*/*_color.png", "depth": "lr/*_depth.png"}``.
    Files of different kinds are paired by their **key**: the parts of the file name matched by the
    glob's wildcards (``*``, ``?``, ``[...]``, ``**``), joined by ``/``; the key is the item id. A value
    without wildcards is one file shared by every item (e.g. one intrinsics JSON). A key that misses a
    required kind becomes an item with that input missing: it is reported as failed, the others run.

Manifest mode (:func:`read_manifest`)
    CSV with a header row, or JSON lines (``.jsonl`` / ``.ndjson``, one object per line). Columns /
    keys named like the task's input kinds are input paths (relative paths are relative to the
    manifest's folder); ``id`` is the item id (default: the first input's file stem); every other
    column is a per-item option of the task (``steps``, ``depth_scale`` ...; empty CSV cells are
    left unset). JSON lines may also nest the options under ``"options"``.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Item", "check_item_id", "discover", "has_wildcards", "read_manifest"]

_WILDCARD = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Item:
    """One unit of work.

    Attributes
    ----------
    id : the item's name; the outputs are written under it (``<out>/<id>.png``, ``<out>/<id>.json``).
        May contain ``/`` (sub-folders), never ``..`` or a leading ``/``.
    inputs : input kind -> file path (``{"rgb": ..., "depth": ...}``).
    options : per-item task options; they override the run's options.
    source : where the item came from (manifest line, or the glob), for error messages.
    """

    id: str
    inputs: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def has_wildcards(pattern: str) -> bool:
    """True if ``pattern`` contains a glob wildcard (``*``, ``?`` or ``[``)."""
    return bool(_WILDCARD.search(str(pattern)))


def check_item_id(item_id: object) -> str:
    """Return ``item_id`` if it is a safe relative name, else raise ``ValueError`` naming it."""
    if not isinstance(item_id, str) or not item_id.strip():
        raise ValueError(f"item id must be a non-empty string, got {item_id!r}")
    parts = item_id.replace("\\", "/").split("/")
    if item_id.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"item id {item_id!r} must be a relative name without '.', '..' or empty parts")
    if any(p.startswith(".") for p in parts):
        raise ValueError(f"item id {item_id!r}: parts must not start with '.' (reserved for temporary files)")
    return item_id


def _glob_regex(pattern: str) -> re.Pattern:
    """A regex matching what ``glob`` matches for ``pattern``, one group per wildcard run."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("((?:[^/]*/)*?)")
            i += 3
        elif pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif c == "*":
            out.append("([^/]*)")
            i += 1
        elif c == "?":
            out.append("([^/])")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1 : j]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"([{body}])")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _key(match: re.Match) -> str:
    parts = [g.strip("/") for g in match.groups()]
    return "/".join(p for p in parts if p)


def discover(patterns: dict[str, str]) -> list[Item]:
    """Items from one glob per input kind, paired by the wildcard key (module docstring).

    Parameters
    ----------
    patterns : input kind -> glob (per-item files) or plain path (one file shared by all items).

    Returns
    -------
    Items sorted by id; hidden files (names starting with ``.``) are ignored. A key that lacks a
    kind gets no such input: the run reports that item as failed, naming the missing kind.

    Raises
    ------
    ValueError
        No pattern with wildcards, or a glob that matches no file at all.
    """
    globs = {k: str(v) for k, v in patterns.items() if v is not None and has_wildcards(str(v))}
    shared = {k: str(v) for k, v in patterns.items() if v is not None and not has_wildcards(str(v))}
    if not globs:
        raise ValueError(
            f"no input glob given (patterns {patterns}): at least one input kind needs a pattern with a "
            f"wildcard, e.g. --rgb 'frames/*.png'"
        )
    found: dict[str, dict[str, str]] = {}
    for kind, pattern in globs.items():
        rx = _glob_regex(os.path.normpath(pattern) if not pattern.endswith("/") else pattern)
        hits = 0
        for path in sorted(glob.glob(pattern, recursive=True)):
            if Path(path).name.startswith(".") or not Path(path).is_file():
                continue
            m = rx.match(os.path.normpath(path))
            if m is None:  # pragma: no cover - glob and the regex disagree (exotic patterns)
                continue
            key = _key(m) or Path(path).stem
            if kind in found.setdefault(key, {}):
                raise ValueError(
                    f"--{kind} {pattern!r}: files {found[key][kind]} and {path} give the same key {key!r}"
                )
            found[key][kind] = path
            hits += 1
        if not hits:
            raise ValueError(f"--{kind} {pattern!r} matches no file")
    items = []
    for key in sorted(found):
        inputs = {**shared, **found[key]}
        items.append(Item(check_item_id(key), inputs, {}, f"glob key {key!r}"))
    return items


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else base / p)


def read_manifest(path: str | os.PathLike, input_kinds: tuple[str, ...]) -> list[Item]:
    """Items from a CSV or JSON-lines manifest (module docstring).

    Parameters
    ----------
    path : ``.csv``, or ``.jsonl`` / ``.ndjson`` / ``.json`` (one JSON object per line).
    input_kinds : the task's input kinds (every other column is an option).

    Raises
    ------
    FileNotFoundError
        No manifest at ``path``.
    ValueError
        Unknown suffix, a line that is not a JSON object, no rows, or duplicate item ids
        (the message names the line).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest file not found: {p}")
    base = p.parent
    rows: list[tuple[str, dict[str, Any]]] = []
    suffix = p.suffix.lower()
    if suffix == ".csv":
        with p.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise ValueError(f"manifest {p}: empty file (expected a header row)")
            for i, row in enumerate(reader, start=2):
                if None in row:
                    raise ValueError(f"manifest {p} line {i}: more cells than header columns")
                rows.append(
                    (
                        f"{p}:{i}",
                        {k.strip(): v.strip() for k, v in row.items() if v is not None and v.strip()},
                    )
                )
    elif suffix in (".jsonl", ".ndjson", ".json"):
        for i, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"manifest {p} line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"manifest {p} line {i}: expected a JSON object, got {type(obj).__name__}")
            opts = obj.pop("options", {}) or {}
            if not isinstance(opts, dict):
                raise ValueError(f"manifest {p} line {i}: 'options' must be an object")
            rows.append((f"{p}:{i}", {**obj, **opts}))
    else:
        raise ValueError(f"manifest {p}: unsupported type {p.suffix!r}; use .csv or .jsonl")
    if not rows:
        raise ValueError(f"manifest {p} has no items")
    items, seen = [], {}
    for where, row in rows:
        inputs = {k: _resolve(str(v), base) for k, v in row.items() if k in input_kinds}
        options = {k: v for k, v in row.items() if k not in input_kinds and k != "id"}
        item_id = row.get("id")
        if item_id is None:
            if not inputs:
                raise ValueError(f"manifest {where}: no id and no input column ({', '.join(input_kinds)})")
            first = next(k for k in input_kinds if k in inputs)
            item_id = Path(inputs[first]).stem
        try:
            item_id = check_item_id(str(item_id))
        except ValueError as e:
            raise ValueError(f"manifest {where}: {e}") from None
        if item_id in seen:
            raise ValueError(f"manifest {where}: duplicate item id {item_id!r} (first at {seen[item_id]})")
        seen[item_id] = where
        items.append(Item(item_id, inputs, options, where))
    return items
