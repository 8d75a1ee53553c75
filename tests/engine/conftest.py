"""Fixtures of the engine tests.

``readme_blocks(marker)``: the python code blocks of README.md between ``<!-- MARKER:start -->``
and ``<!-- MARKER:end -->``, as written there (the README's examples run as tests).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="session")
def readme_blocks() -> Callable[[str], list[str]]:
    """``readme_blocks("example-queries") -> [code, ...]``: the README's python blocks between
    that marker's start and end comments (read when called: the README is the source)."""

    def blocks(marker: str) -> list[str]:
        section = README.read_text().split(f"<!-- {marker}:start -->", 1)[1]
        section = section.split(f"<!-- {marker}:end -->", 1)[0]
        return re.findall(r"```python\n(.*?)```", section, flags=re.S)

    return blocks
