"""The package stack ``partitions`` <- ``serve_app`` <- ``cluster`` <- ``partserve``: no package imports one above
it (imports inside functions count too), there is no top-level ``cli`` package, and the facade is whole."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys

import partserve
from tests import REPO

STACK = ["partitions", "serve_app", "cluster", "partserve"]
"""Bottom to top: a package may import those before it, never those after it."""


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``tree``, at any depth, and of every
    ``importlib.import_module("literal")``; relative imports stay inside their package and are skipped."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def upward_imports(package: str) -> list[str]:
    """``file:line imports module`` for each import in ``package`` of a package above it in :data:`STACK`."""
    above = set(STACK[STACK.index(package) + 1 :])
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in imported_modules(tree):
            if module.split(".")[0] in above:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return bad


def test_packages_import_only_downwards() -> None:
    for package in STACK[:-1]:
        assert (REPO / package / "__init__.py").is_file(), package
    bad = [line for package in STACK[:-1] for line in upward_imports(package)]
    assert not bad, "imports against the stack partitions <- serve_app <- cluster <- partserve:\n" + "\n".join(bad)


def test_the_check_sees_upward_imports() -> None:
    tree = ast.parse("import os\nfrom cluster.deploy import x\ndef f():\n    import partserve.cli\nfrom . import y\n")
    assert imported_modules(tree) == [(1, "os"), (2, "cluster.deploy"), (4, "partserve.cli")]


def test_no_top_level_cli_package() -> None:
    assert not (REPO / "cli").exists(), "the CLI lives in partserve/cli; a top-level cli/ shadows (and is shadowed)"
    spec = importlib.util.find_spec("cli")
    assert spec is None or not str(spec.origin or "").startswith(str(REPO)), spec


def test_facade_exports() -> None:
    assert {"load_model", "plan", "verify", "serve_config", "__version__"} <= set(partserve.__all__)
    for name in partserve.__all__:
        assert getattr(partserve, name) is not None, name


def test_python_m_partserve_help() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "partserve", "--help"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_entrance_and_batch_reads_import_no_torch() -> None:
    """An entrance replica and a batch job's read tasks parse requests and Parquet and read plan.json; torch
    (1.5 s of CPU and 180 MB per process, measured) belongs to the stage replicas alone."""
    code = "import sys, serve_app.entrance, cluster.batch.files; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", "serve_app.entrance or cluster.batch.files imports torch"
