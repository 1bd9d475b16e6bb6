"""The import graph of mid_tf: no circle, and no import from a lower layer to a higher one.

Read from the source with `ast` (every import, module-level or inside a function), so a lazy import
that would close a circle at run time counts too. The layer map below is the architecture: apps →
stages → training | evaluation | export | serving → artifacts → attacks | models | config → data →
kernels | compat | hardware. A module may import its own layer or any layer below it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mid_tf"

LAYERS = {
    "mid_tf.cli": 7,
    # Entry points kept beside the library code they drive (documented as `python -m ...`).
    "mid_tf.attacks.table": 7, "mid_tf.serving.client": 7, "mid_tf.serving.__main__": 7,
    "mid_tf.stages": 6,
    "mid_tf.training": 5, "mid_tf.evaluation": 5, "mid_tf.export": 5, "mid_tf.serving": 5,
    "mid_tf.artifacts": 4,
    "mid_tf.attacks": 3, "mid_tf.models": 3, "mid_tf.config": 3,
    "mid_tf.data": 2,
    "mid_tf.kernels": 1, "mid_tf.compat": 1, "mid_tf.hardware": 1,
    "mid_tf": 0,  # the package's __init__ (version only)
}


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str, layers: dict) -> int:
    """The layer of the longest prefix of `module` in the map (KeyError: the module has no room)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in layers:
            return layers[prefix]
    raise KeyError(module)


def imports_of(path: pathlib.Path, module: str, modules: set) -> set:
    """mid_tf modules that `path` imports; `from pkg import sub` counts as an import of pkg.sub."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mid_tf")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "mid_tf":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    found.discard(module)
    return found


def import_graph(root: pathlib.Path = PACKAGE) -> dict:
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {m: imports_of(p, m, set(paths)) for m, p in paths.items()}


def back_imports(graph: dict, layers: dict) -> list:
    return sorted((m, dep) for m, deps in graph.items() for dep in deps
                  if layer_of(dep, layers) > layer_of(m, layers))


def circles(graph: dict) -> list:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if not _placed(m)]
    assert not unplaced, f"modules without a room in LAYERS (add them to the map): {unplaced}"


def _placed(module: str) -> bool:
    try:
        layer_of(module, LAYERS)
        return True
    except KeyError:
        return False


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = back_imports(import_graph(), LAYERS)
    assert not bad, "imports against the layering (importer, imported): " + str(bad)


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_only_the_apps_read_flags():
    readers = sorted(m for m, p in ((module_name(p, PACKAGE), p) for p in PACKAGE.rglob("*.py"))
                     if "absl import" in p.read_text() and "flags" in p.read_text()
                     and layer_of(m, LAYERS) != LAYERS["mid_tf.cli"])
    assert readers == [], f"modules below the apps that read absl flags: {readers}"


@pytest.mark.parametrize("planted, expect", [
    ("from mid_tf import stages\n", "back"),        # models -> stages: a lower layer importing a higher one
    ("import mid_tf.models.lenet\n", "circle"),      # same layer, closes a circle through lenet
])
def test_the_checks_catch_a_planted_import(tmp_path, planted, expect):
    import shutil
    root = tmp_path / "mid_tf"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    victim = root / "models" / "factory.py"
    if expect == "circle":  # lenet imports nothing of factory's today; make factory <-> lenet mutual
        (root / "models" / "lenet.py").write_text((root / "models" / "lenet.py").read_text()
                                                   + "\nfrom mid_tf.models import factory\n")
    victim.write_text(victim.read_text() + "\n" + planted)
    graph = import_graph(root)
    if expect == "back":
        assert ("mid_tf.models.factory", "mid_tf.stages") in back_imports(graph, LAYERS)
    else:
        assert any("mid_tf.models.factory" in c and "mid_tf.models.lenet" in c for c in circles(graph))
