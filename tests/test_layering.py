"""The package layering, checked on the source: checkpoint (I/O) < kernels (numerics) < workers
(what runs on a worker) < pipeline (the job). A module may import its own package or one below
it, never one above; and no two modules import each other (not even inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import aser

ROOT = Path(aser.__file__).parent
LAYERS = {"checkpoint": 0, "kernels": 1, "workers": 2, "pipeline": 3}


def _imports(path: Path, top_level_only: bool) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aser"):
            # `from aser.pkg import mod` imports the module aser.pkg.mod when there is one
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append(sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("aser")]
    return out


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts): p for p in ROOT.rglob("*.py")}


def test_no_module_imports_a_package_above_its_own():
    upward = []
    for name, path in _modules().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        for target in _imports(path, top_level_only=False):  # function-level imports count too
            tparts = target.split(".")
            if len(tparts) > 1 and tparts[1] in LAYERS and LAYERS[tparts[1]] > LAYERS[parts[1]]:
                upward.append(f"{name} imports {target}")
    assert upward == []


def test_no_two_modules_import_each_other():
    mods = _modules()
    graph = {n: {t for t in _imports(p, top_level_only=False) if t in mods and t != n} for n, p in mods.items()}
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))
    assert cycles == []


def test_the_check_sees_an_upward_import(tmp_path: Path):
    """The checker itself: a source line importing pipeline from kernels is found."""
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from aser.pipeline import driver\n")
    assert "aser.pipeline.driver" in _imports(bad, top_level_only=False)
    assert _imports(bad, top_level_only=True) == []
