"""The three layers import one way: apps -> integration -> algorithm (no DeepSpeed in algorithm)."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "leap_ds"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = path.relative_to(PKG.parent).with_suffix("").parts[:-node.level]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            names.add(base)
    return names


def test_algorithm_layer_imports_no_deepspeed_and_no_upper_layer():
    for f in (PKG / "algorithm").glob("*.py"):
        for name in imported_modules(f):
            assert not name.startswith("deepspeed"), (f, name)
            assert not name.startswith(("leap_ds.integration", "leap_ds.apps")), (f, name)


def test_integration_layer_does_not_import_apps():
    for f in (PKG / "integration").glob("*.py"):
        assert not any(n.startswith("leap_ds.apps") for n in imported_modules(f)), f


def test_algorithm_runs_without_deepspeed_loaded():
    code = ("import sys, leap_ds.algorithm as a; "
            "assert not [m for m in sys.modules if m.startswith('deepspeed')], 'deepspeed imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PKG.parent)


def test_export_layer_sits_above_algorithm_and_integration():
    for layer in ("algorithm", "integration"):
        for f in (PKG / layer).glob("*.py"):
            assert not any(n.startswith("leap_ds.export") for n in imported_modules(f)), f
    for f in (PKG / "export").glob("*.py"):
        assert not any(n.startswith("leap_ds.apps") for n in imported_modules(f)), f
