"""Fixtures of the analysis tests (``codelens report``, ``plot`` and ``compare``).

``invoke(*args)``: the ``codelens`` CLI run in-process (``CliRunner``) with ``args`` as strings;
exceptions propagate (``catch_exceptions=False``), so a crash shows its traceback.

``chromium``: a headless Chromium (the first of ``chromium``, ``chromium-browser``,
``google-chrome`` on PATH); the test is skipped when there is none. ``chromium.run(profile,
*args)`` runs it with the offline, sandbox-free flags the tests use and a fresh profile folder;
``chromium.inspect(page, workdir)`` opens ``page`` in a frame of a probe page (written to
``workdir``) and returns what the browser made of it: ``{"imgs": [[src, natural width, natural
height], ...], "tables": [rows per table], "h2": [heading texts]}``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from codelens.workers.cli import app

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# The probe page loads the page under test in a frame and writes what the browser made of it
# (decoded image sizes, tables, headings) into its own DOM, which --dump-dom prints.
PROBE = (
    '<!DOCTYPE html><html><body><iframe id="f" src="{src}" width="1400" '
    'height="2000"></iframe><pre id="out">pending</pre><script>'
    "document.getElementById('f').addEventListener('load', () => {{"
    "const d = document.getElementById('f').contentDocument;"
    "document.getElementById('out').textContent = JSON.stringify({{"
    "imgs: [...d.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight]),"
    "tables: [...d.querySelectorAll('table')].map(t => t.rows.length),"
    "h2: [...d.querySelectorAll('h2')].map(h => h.textContent)}});}});"
    "</script></body></html>"
)


@pytest.fixture(scope="session")
def invoke() -> Callable[..., Result]:
    """``invoke("report", run_dir, "--out", path)``: the CLI's ``Result`` (``exit_code``,
    ``output``)."""

    def run(*args: Any) -> Result:
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


@dataclasses.dataclass(frozen=True)
class Chromium:
    """The browser found on PATH (``binary``), run headless."""

    binary: str

    def run(self, profile: Path, *args: str) -> subprocess.CompletedProcess:
        flags = [*FLAGS, f"--user-data-dir={profile}"]
        return subprocess.run(
            [self.binary, *flags, *args], capture_output=True, text=True, timeout=90
        )

    def inspect(self, page: Path, workdir: Path) -> dict[str, Any]:
        probe = workdir / "probe.html"
        probe.write_text(PROBE.format(src=page.resolve().as_uri()))
        done = self.run(
            workdir / "profile",
            "--allow-file-access-from-files",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.as_uri(),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        dump = done.stdout.split('<pre id="out">', 1)[1].split("</pre>", 1)[0]
        return json.loads(dump.replace("&amp;", "&"))


@pytest.fixture
def chromium() -> Chromium:
    """A headless Chromium to open pages in, or a skip (see this module's docstring)."""
    binary = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if binary is None:
        pytest.skip(
            "no Chromium here (apt-get install -y chromium; .ci/run installs it when run as root)"
        )
    return Chromium(binary)
