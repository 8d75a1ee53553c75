"""The three folders install under the ``codelens`` namespace, never as bare top-level modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def test_imports_run_workers_to_engine_to_kernels():
    for path in (ROOT / "kernels").rglob("*.py"):
        text = path.read_text()
        assert "codelens.engine" not in text and "codelens.workers" not in text, path
    for path in (ROOT / "engine").rglob("*.py"):
        assert "codelens.workers" not in path.read_text(), path
    for top in ("engine", "kernels", "workers"):
        for path in (ROOT / top).rglob("*.py"):
            if path.name != "ray_backend.py":
                assert "import ray" not in path.read_text(), (
                    f"only workers/ray_backend.py imports ray: {path}"
                )


def test_importing_kernels_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, codelens.kernels, codelens.engine.run.runner; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
