"""Import layering of the ua3d package, checked on the source (``ast``), so that CI enforces it.

Layers (a module may import its own layer and the layers below it, never one above)::

    0  ua3d.core                                  stateless functional core (tensor in, tensor out)
    1  ua3d.api, ua3d (the package root)          the public face: Kernel, fit, upsample
    1  ua3d.features                              beside the api: feature sources, image handling,
                                                  checkpoints; needs core only (not api, and api
                                                  does not need it)
    2  ua3d.baselines, ua3d.rgbd, ua3d.depth      methods built on the kernel
    3  ua3d.io, ua3d.viz                          files and pictures
    4  ua3d.cli, ua3d.demo, ua3d.eval, ua3d.batch  entry points and harnesses

Every import counts, also the lazy ones inside functions (they still make a cycle at run time);
imports under ``if TYPE_CHECKING:`` do not (annotations only). A third rule: lower layers take the
validation / memory helpers from ``ua3d.core``, not from the public face, so ``ua3d.api`` is imported
for its public names only.

A new top-level module or package must be given a layer here (the test says so).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ua3d"

LAYERS = {
    "ua3d.core": 0,
    "ua3d": 1,
    "ua3d.api": 1,
    "ua3d.features": 1,
    "ua3d.baselines": 2,
    "ua3d.rgbd": 2,
    "ua3d.depth": 2,
    "ua3d.io": 3,
    "ua3d.viz": 3,
    "ua3d.cli": 4,
    "ua3d.cli_fuse": 4,
    "ua3d.demo": 4,
    "ua3d.eval": 4,
    "ua3d.batch": 4,
}
#: same-layer neighbours that must not import each other: (importer prefix, imported prefix)
SIBLINGS_APART = {("ua3d.features", "ua3d.api"), ("ua3d.api", "ua3d.features")}
#: the only names lower layers may import from ua3d.api
API_PUBLIC = {"Kernel", "fit", "upsample", "FitConfig"}

# Known violations, fixed on other branches in parallel; the integrator empties these lists after
# merging (an entry that no longer occurs fails the test, so they cannot go stale).
KNOWN_CYCLES: set[frozenset[str]] = set()
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_API_HELPERS: set[tuple[str, str]] = set()  # validation / memory helpers come from ua3d.core


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """``(imported ua3d module, names taken from it)`` for every import of module ``name``."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name == "ua3d" or a.name.startswith("ua3d.")]
            continue
        if node.level:
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target != "ua3d" and not target.startswith("ua3d."):
            continue
        plain = []
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in modules:  # `from pkg import submodule`
                out.append((sub, []))
            else:
                plain.append(alias.name)
        if plain:
            out.append((target, plain))
    resolved = []
    for target, names in out:
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        resolved.append((target, names))
    return resolved


def _layer(name: str) -> int | None:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    names: dict[tuple[str, str], list[str]] = {}
    for m, path in modules.items():
        for target, taken in _imports(m, path, modules):
            if target != m:
                edges[m].add(target)
                names.setdefault((m, target), []).extend(taken)
    return edges, names


def _cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


EDGES, NAMES = _graph()


def test_the_checker_sees_the_package():
    # guards against a checker that passes because it reads nothing
    assert len(EDGES) > 30
    assert "ua3d.core.kernel" in EDGES["ua3d.core.fast.pool"]  # `from ..kernel import`
    assert "ua3d.core.fast.fit" in EDGES["ua3d.core.fast"]
    assert "ua3d.baselines.anyup" in EDGES["ua3d.depth.evaluate"]  # `from ua3d.baselines import anyup`
    assert "ua3d.features.image" in EDGES["ua3d.baselines.anyup.baseline"]  # relative, three dots
    assert "ua3d.baselines.anyup.model" not in EDGES["ua3d.baselines.anyup.fused"]  # TYPE_CHECKING only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_every_module_has_a_layer():
    missing = sorted(m for m in EDGES if _layer(m) is None)
    assert not missing, f"give these modules a layer in tests/test_layers.py LAYERS: {missing}"


def test_no_import_cycles():
    cycles = set(_cycles(EDGES))
    new = sorted(sorted(c) for c in cycles - KNOWN_CYCLES)
    assert not new, f"import cycles: {new}"
    gone = sorted(sorted(c) for c in KNOWN_CYCLES - cycles)
    assert not gone, f"fixed: remove from KNOWN_CYCLES: {gone}"


def test_no_module_imports_a_layer_above_it():
    upward = set()
    for m, targets in EDGES.items():
        lm = _layer(m)
        for t in targets:
            lt = _layer(t)
            apart = any(m.startswith(a) and (t == b or t.startswith(b + ".")) for a, b in SIBLINGS_APART)
            if lm is not None and lt is not None and (lt > lm or apart):
                upward.add((m, t))
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, f"imports of a layer above (importer, imported): {new}"
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"fixed: remove from KNOWN_UPWARD: {gone}"


@pytest.mark.parametrize("layer", [2, 3])
def test_lower_layers_take_only_public_names_from_the_api(layer):
    # the cli (layer 4) may use anything; layers 2-3 take helpers from ua3d.core
    helpers = {
        (m, n)
        for (m, t), taken in NAMES.items()
        if t == "ua3d.api" and _layer(m) == layer
        for n in taken
        if n not in API_PUBLIC
    }
    known = {k for k in KNOWN_API_HELPERS if _layer(k[0]) == layer}
    new = sorted(helpers - known)
    assert not new, f"helpers imported from ua3d.api (take them from ua3d.core): {new}"
    gone = sorted(known - helpers)
    assert not gone, f"fixed: remove from KNOWN_API_HELPERS: {gone}"
