"""Code that every Debian machine ships, per language, split into train / held-out files.

The bundled default model is trained on it (:mod:`codelens.engine.zoo.train_default`) and the demo
reads its held-out files, so nothing is downloaded. Four languages, each from where Debian puts it:

========  ================================================  =====================================
language  files                                             package (licence)
========  ================================================  =====================================
python    ``*.py`` of the running interpreter's standard     CPython (PSF License 2.0)
          library, without ``site-packages`` and tests
c         ``*.h`` under ``/usr/include`` that contain no     libc6-dev (LGPL-2.1+), linux-libc-dev
          C++ (``namespace``, ``template <``, ``class X``);  (GPL-2.0 WITH Linux-syscall-note),
          the C++-only trees are skipped                    others: /usr/share/doc/PKG/copyright
perl      ``*.pm`` under Perl's library directories          perl, perl-base, perl-modules (GPL-1+
          (``/usr/share/perl*``, ``/usr/lib/*/perl*``)       or Artistic), other libPERL packages
shell     files starting ``#!/bin/sh`` / ``#!/bin/bash``     each script's package (dpkg -S FILE
          (or named ``*.sh``) under ``/usr/bin``,            names it; its copyright file under
          ``/usr/sbin``, ``/etc``, ``/usr/lib``,             /usr/share/doc)
          ``/usr/share``
========  ================================================  =====================================

Split: a file is *held out* when ``sha256(path relative to its language's root)`` read as an
integer is 0 modulo ``HELD_OUT_MODULUS`` (20, ~5%); for Python this is the rule of the first
bundled model. The rule depends only on the path, so a file is held out on every machine and
version that has it, and never trained on anywhere. Shell scripts are keyed by their absolute
path (they have no common root).

The C headers (~7,000 files) and Perl modules are many more bytes than the model needs, so each
language's training files are capped (``train_bytes``): files are taken in the order of their
path hash (which mixes directories) until the cap. Held-out files are capped the same way
(``held_out_bytes``), so evaluation and the demo stay a few minutes on a CPU. Which files fill a
cap depends on the files a machine has (a machine with other packages takes other headers), so
the *selection* is the same only where the same files are installed; the split is everywhere.
``/etc`` scripts are the Debian packages' own (init scripts, session scripts).
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HELD_OUT_MODULUS = 20
"""A file is held out when ``int(sha256(key)) % HELD_OUT_MODULUS == 0`` (~5%)."""

MAX_FILE_BYTES = 200_000
"""Larger files are skipped in every language (generated tables, amalgamations)."""

PYTHON_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
"""Standard-library directories (at any depth) whose files are neither trained on nor held out."""

C_EXCLUDED_TOP_DIRS = ("c++", "llvm", "node", "unicode", "boost", "qt")
"""Top-level ``/usr/include`` trees skipped as C++ (prefix match: ``llvm-14``, ``qt5``)."""

_CPP_MARKERS = re.compile(r"\bnamespace\s+\w|\btemplate\s*<|^\s*class\s+\w+\s*[:{]", re.M)
_PERL_VERSION_DIR = re.compile(r"^\d+(\.\d+)*/")
_SHELL_SHEBANG = re.compile(rb"^#!\s*(/usr)?/bin/(env\s+)?(ba|da)?sh\b")

SHELL_ROOTS = ("/usr/bin", "/usr/sbin", "/etc", "/usr/lib", "/usr/share")
PERL_ROOT_GLOBS = (
    "/usr/share/perl5",
    "/usr/share/perl/*",
    "/usr/lib/*/perl*/*",
    "/usr/lib/*/perl*",
)


@dataclass(frozen=True)
class SourceFile:
    """One file of the data set."""

    language: str
    key: str
    """The path the split hashes: relative to the language's root (absolute for shell)."""
    path: Path

    @property
    def held_out(self) -> bool:
        return is_held_out(self.key)


@dataclass(frozen=True)
class LanguageSource:
    """Where one language's files are on this machine, and how many bytes of it to use."""

    language: str
    description: str
    licence: str
    lexer: str
    """The Pygments lexer of the language (``{keywords: LEXER}`` token sets)."""
    train_bytes: int
    """Cap on training bytes (files in path-hash order until the cap)."""
    held_out_bytes: int
    """Cap on held-out bytes, likewise."""
    scan: Callable[[], Iterator[tuple[str, Path]]]
    """Yields ``(key, path)`` of every candidate file, any order."""


def is_held_out(key: str | Path) -> bool:
    """The split rule: held out iff sha256(key) is 0 mod ``HELD_OUT_MODULUS``."""
    return int(_digest(key), 16) % HELD_OUT_MODULUS == 0


def _digest(key: str | Path) -> str:
    return hashlib.sha256(Path(key).as_posix().encode("utf-8")).hexdigest()


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_excluded_python(rel_path: str | Path) -> bool:
    """True for standard-library paths outside the data set: ``site-packages``, tests."""
    parts = Path(rel_path).parts
    return bool(PYTHON_EXCLUDED_DIRS.intersection(parts[:-1])) or parts[-1].startswith("test_")


def _small_file(path: Path) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_FILE_BYTES
    except OSError:
        return False


def _scan_python() -> Iterator[tuple[str, Path]]:
    root = stdlib_root()
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not is_excluded_python(rel) and _small_file(p):
            yield rel.as_posix(), p


def _scan_c() -> Iterator[tuple[str, Path]]:
    root = Path("/usr/include")
    if not root.is_dir():
        return
    for p in root.rglob("*.h"):
        rel = p.relative_to(root)
        if rel.parts[0].lower().startswith(C_EXCLUDED_TOP_DIRS) or not _small_file(p):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not _CPP_MARKERS.search(text):
            yield rel.as_posix(), p


def _scan_perl() -> Iterator[tuple[str, Path]]:
    seen: set[str] = set()
    roots = sorted(
        {r for g in PERL_ROOT_GLOBS for r in Path("/").glob(g.lstrip("/")) if r.is_dir()}
    )
    for root in roots:
        for p in root.rglob("*.pm"):
            # Keyed by the module path ("File/Temp.pm"), not by the version directory above it,
            # so the split does not move when Perl is upgraded.
            key = _PERL_VERSION_DIR.sub("", p.relative_to(root).as_posix())
            if key not in seen and _small_file(p):
                seen.add(key)
                yield key, p


def _scan_shell() -> Iterator[tuple[str, Path]]:
    for root in SHELL_ROOTS:
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                if not _small_file(p):
                    continue
                try:
                    with p.open("rb") as f:
                        head = f.read(64)
                except OSError:
                    continue
                if _SHELL_SHEBANG.match(head) or (name.endswith(".sh") and b"\0" not in head):
                    yield p.as_posix(), p


SOURCES: dict[str, LanguageSource] = {
    s.language: s
    for s in (
        LanguageSource(
            "python",
            "CPython standard library (*.py, no site-packages or tests)",
            "PSF License 2.0",
            "python",
            train_bytes=14_000_000,
            held_out_bytes=1_500_000,
            scan=_scan_python,
        ),
        LanguageSource(
            "c",
            "C headers under /usr/include (no C++)",
            "per package: libc6-dev LGPL-2.1+, linux-libc-dev GPL-2.0 WITH Linux-syscall-note",
            "c",
            train_bytes=3_000_000,
            held_out_bytes=400_000,
            scan=_scan_c,
        ),
        LanguageSource(
            "perl",
            "Perl modules (*.pm) of perl, perl-base and perl-modules",
            "GPL-1.0+ or Artistic-1.0 (perl); other modules per package",
            "perl",
            train_bytes=2_500_000,
            held_out_bytes=400_000,
            scan=_scan_perl,
        ),
        LanguageSource(
            "shell",
            "sh/bash scripts in /usr/bin, /usr/sbin, /etc, /usr/lib, /usr/share",
            "per package (/usr/share/doc/PKG/copyright)",
            "bash",
            train_bytes=1_500_000,
            held_out_bytes=300_000,
            scan=_scan_shell,
        ),
    )
}
"""The bundled model's languages, in the order they are reported."""


def all_files(language: str) -> list[SourceFile]:
    """Every file of ``language`` on this machine (train and held-out, before the byte caps),
    sorted by key."""
    source = SOURCES[language]
    return sorted((SourceFile(language, k, p) for k, p in source.scan()), key=lambda f: f.key)


@cache
def split(language: str) -> tuple[tuple[SourceFile, ...], tuple[SourceFile, ...]]:
    """``(train, held_out)`` files of one language on this machine, each within its byte cap.

    Files are taken in the order of their key's hash until the cap, so the selection mixes
    directories and is the same on every machine with the same files. Empty tuples where the
    language has no files here (a machine without ``/usr/include``).
    """
    source = SOURCES[language]
    found = sorted((_digest(key), SourceFile(language, key, path)) for key, path in source.scan())
    train: list[SourceFile] = []
    held: list[SourceFile] = []
    used = {False: 0, True: 0}
    for _, f in found:
        cap = source.held_out_bytes if f.held_out else source.train_bytes
        size = f.path.stat().st_size
        if used[f.held_out] + size > cap:
            continue
        used[f.held_out] += size
        (held if f.held_out else train).append(f)
    return tuple(sorted(train, key=lambda f: f.key)), tuple(sorted(held, key=lambda f: f.key))


def read_text(f: SourceFile) -> str | None:
    """The file's UTF-8 text, or None when it does not decode or is blank."""
    try:
        text = f.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def held_out_sample(
    n_files: int, language: str = "python", *, min_bytes: int = 2_000, max_bytes: int = 40_000
) -> list[Path]:
    """``n_files`` held-out files of ``language`` evenly spaced over the sorted list.

    Raises:
        FileNotFoundError: this machine has no held-out files of that size in that language.
    """
    candidates = [
        f.path for f in split(language)[1] if min_bytes <= f.path.stat().st_size <= max_bytes
    ]
    if not candidates:
        raise FileNotFoundError(
            f"no held-out {language} sources of {min_bytes}-{max_bytes} bytes on this machine "
            f"({SOURCES[language].description})"
        )
    n = max(1, min(n_files, len(candidates)))
    step = len(candidates) / n
    return [candidates[int(i * step)] for i in range(n)]
