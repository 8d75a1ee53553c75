"""The three folders install under the ``codelens`` namespace, never as bare top-level modules."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for top in ("engine", "kernels", "workers"):
        assert config["package-dir"][f"codelens.{top}"] == top
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            name = "codelens." + ".".join(rel.parts)
            assert name in listed, f"{name} is missing from [tool.setuptools].packages"


def test_bare_names_are_not_importable():
    for bare in ("engine", "workers"):
        assert importlib.util.find_spec(bare) is None, f"bare '{bare}' must not be importable"
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "codelens" not in str(spec.origin)


ENGINE_RANK = {"model": 1, "data": 1, "run": 2, "zoo": 2, "analysis": 3}
"""Inside engine/, a sub-package imports only from lower ranks (and itself); the contract
modules at engine/'s top (schemas, errors, row_schema) are rank 0, open to all."""


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` of every import statement in a file, at any depth
    (function-local imports included), with relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(("codelens",) + path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def source_files() -> list[Path]:
    return [p for top in ("engine", "kernels", "workers") for p in (ROOT / top).rglob("*.py")]


def owner(path: Path) -> tuple[str, str | None]:
    """(top folder, engine sub-package or None) of a source file."""
    parts = path.relative_to(ROOT).parts
    sub = parts[1] if parts[0] == "engine" and len(parts) > 2 else None
    return parts[0], sub


def target(module: str) -> tuple[str, str | None] | None:
    """(top, engine sub-package or None) of a codelens module; None for other packages."""
    parts = module.split(".")
    if parts[0] != "codelens" or len(parts) < 2:
        return None
    sub = parts[2] if parts[1] == "engine" and len(parts) > 2 and parts[2] in ENGINE_RANK else None
    return parts[1], sub


def test_imports_run_one_way():
    """workers -> engine -> kernels, and inside engine analysis -> run -> model/data (parsed)."""
    top_rank = {"kernels": 0, "engine": 1, "workers": 2}
    problems = []
    for path in source_files():
        top, sub = owner(path)
        for module, _, line in imports_of(path):
            hit = target(module)
            if hit is None:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if top_rank[hit[0]] > top_rank[top]:
                problems.append(where)
            elif top == "engine" == hit[0] and sub is not None and hit[1] not in (None, sub):
                if ENGINE_RANK[hit[1]] >= ENGINE_RANK[sub]:
                    problems.append(where)
            elif top == "engine" == hit[0] and sub is None and path.name != "__init__.py":
                if hit[1] is not None:  # the contract modules import no sub-package
                    problems.append(where)
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_no_private_names_cross_modules():
    problems = [
        f"{path.relative_to(ROOT)}:{line} imports {name} from {module}"
        for path in source_files()
        for module, names, line in imports_of(path)
        if module.startswith("codelens.")
        for name in names
        if name.startswith("_")
    ]
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "package,allowed",
    [
        ("ray", ["workers/ray_backend.py"]),
        ("matplotlib", ["engine/analysis/"]),
        (
            "torch",
            [
                "engine/model/",
                "engine/run/",
                "engine/analysis/",
                "engine/zoo/",
                "kernels/",
                "workers/",
            ],
        ),
    ],
)
def test_heavy_packages_are_imported_only_where_they_belong(package, allowed):
    """Ray only in its backend, matplotlib only in analysis, no torch in engine/data or the
    contract modules (the planner runs on the driver without a model)."""
    problems = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in source_files()
        for module, _, line in imports_of(path)
        if module.split(".")[0] == package
        and not any(str(path.relative_to(ROOT)).startswith(a) for a in allowed)
    ]
    assert not problems, f"{package} imported outside {allowed}: {problems}"


def test_importing_kernels_does_not_import_triton():
    """Triton (and CUDA) are touched only when the fused kernel runs. Engine modules that load
    transformers may see it imported by transformers itself: not ours to promise, so the check on
    them is that none of our files but the kernels' own import triton at module level."""
    import subprocess
    import sys

    code = "import sys, codelens.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    # The Triton modules, imported lazily by kernels/dispatch.py.
    kernel_modules = {
        ROOT / "kernels" / name for name in ("norm_stage.py", "lens_triton.py", "lens_chunked.py")
    }
    top_level = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in source_files()
        if path not in kernel_modules
        for node in ast.parse(path.read_text()).body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            (alias.name if isinstance(node, ast.Import) else node.module or "").startswith("triton")
            for alias in node.names
        )
    ]
    assert not top_level, f"module-level triton imports: {top_level}"
