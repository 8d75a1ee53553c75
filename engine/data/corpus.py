"""Corpus readers: source files matched by globs, JSONL records, Parquet rows.

Every reader yields :class:`Document` objects numbered ``0, 1, 2, ...`` in a deterministic order
(files sorted by path, then records in file order), so ``doc`` is a stable key across reruns of the
same job: a rerun can skip shards that are already committed.

Two kinds of problems are kept apart:

* **Corpus problems** stop the job with a :class:`~codelens.engine.errors.CorpusError` naming the
  problem and the fix: a glob that matches no file, a record without ``text_field``, a malformed
  JSON line, a Parquet file that cannot be opened.
* **Document problems** never stop the job. The document is still yielded, with ``text=None`` and
  a ``status`` saying why it was skipped, so ``docs.parquet`` lists it:

  ========================  =====================================================================
  status                    rule
  ========================  =====================================================================
  ``too large``             more than ``max_doc_bytes`` bytes (checked before reading a file)
  ``not utf-8``             a UTF-16/UTF-32 byte-order mark, bytes that do not decode as UTF-8,
                            or (JSONL/Parquet) a string holding lone surrogates
  ``binary``                a NUL byte, or more than 10 % control bytes (C0 controls other than
                            tab/newline/vertical tab/form feed/carriage return, plus DEL)
  ``empty``                 nothing but whitespace (or a null text value)
  ``unreadable: <error>``   the file could not be read (permissions, broken link, not a file)
  ========================  =====================================================================

A UTF-8 byte-order mark is stripped from the text.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from codelens.engine.errors import CorpusError

__all__ = [
    "CORPUS_KINDS",
    "Document",
    "LANGUAGE_BY_EXTENSION",
    "LANGUAGE_BY_FILENAME",
    "expand_globs",
    "language_from_path",
    "language_from_shebang",
    "read_corpus",
    "text_document",
]

CORPUS_KINDS = ("files", "jsonl", "parquet")

# Language -> its file extensions. Ambiguous extensions take their most common meaning in code
# corpora (".h" -> c, ".m" -> objective-c, ".pl" -> perl, ".v" -> verilog). Kept this way round,
# one line per language, because it reads (and reviews) better than 150 "ext: lang" pairs.
_EXTENSIONS: dict[str, str] = {
    "python": ".py .pyi .pyw",
    "cython": ".pyx .pxd",
    "c": ".c .h",
    "cpp": ".cc .cpp .cxx .c++ .C .hh .hpp .hxx .h++ .H .ipp .tpp .inl",
    "cuda": ".cu .cuh",
    "objective-c": ".m",
    "objective-cpp": ".mm",
    "csharp": ".cs",
    "fsharp": ".fs .fsi .fsx",
    "java": ".java",
    "kotlin": ".kt .kts",
    "scala": ".scala .sc",
    "groovy": ".groovy .gradle",
    "clojure": ".clj .cljs .cljc .edn",
    "javascript": ".js .mjs .cjs .jsx",
    "typescript": ".ts .mts .cts .tsx",
    "html": ".html .htm",
    "css": ".css",
    "scss": ".scss",
    "sass": ".sass",
    "less": ".less",
    "vue": ".vue",
    "svelte": ".svelte",
    "php": ".php",
    "go": ".go",
    "rust": ".rs",
    "swift": ".swift",
    "zig": ".zig",
    "nim": ".nim",
    "d": ".d",
    "dart": ".dart",
    "ruby": ".rb",
    "perl": ".pl .pm",
    "lua": ".lua",
    "r": ".r",
    "julia": ".jl",
    "haskell": ".hs .lhs",
    "ocaml": ".ml .mli",
    "elixir": ".ex .exs",
    "erlang": ".erl .hrl",
    "elm": ".elm",
    "crystal": ".cr",
    "pascal": ".pas",
    "fortran": ".f .f90 .f95 .f03 .f08",
    "ada": ".adb .ads",
    "cobol": ".cob .cbl",
    "solidity": ".sol",
    "verilog": ".v",
    "systemverilog": ".sv",
    "vhdl": ".vhd .vhdl",
    "assembly": ".s .asm",
    "shell": ".sh .bash .zsh",
    "fish": ".fish",
    "powershell": ".ps1 .psm1",
    "batch": ".bat .cmd",
    "sql": ".sql",
    "protobuf": ".proto",
    "graphql": ".graphql .gql",
    "cmake": ".cmake",
    "makefile": ".mk",
    "hcl": ".tf .hcl",
    "nix": ".nix",
    "json": ".json .jsonc",
    "yaml": ".yaml .yml",
    "toml": ".toml",
    "xml": ".xml",
    "ini": ".ini .cfg",
    "markdown": ".md .markdown",
    "restructuredtext": ".rst",
    "tex": ".tex",
    "text": ".txt",
}

# File extension -> language. Lookup tries the extension as written first (".C" and ".H" are C++
# by convention), then lower-cased (".PY", ".R").
LANGUAGE_BY_EXTENSION: dict[str, str] = {
    ext: language for language, exts in _EXTENSIONS.items() for ext in exts.split()
}

# Files whose name, not extension, says what they are.
LANGUAGE_BY_FILENAME: dict[str, str] = {
    "Makefile": "makefile",
    "makefile": "makefile",
    "GNUmakefile": "makefile",
    "Dockerfile": "dockerfile",
    "CMakeLists.txt": "cmake",
    "Rakefile": "ruby",
    "Gemfile": "ruby",
    "BUILD": "starlark",
    "BUILD.bazel": "starlark",
    "WORKSPACE": "starlark",
}

# C0 control bytes that do not occur in ordinary text, plus DEL. Tab, LF, VT, FF and CR are text.
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])
# A few stray escape bytes (ANSI colours in a log, a form feed in old C) are normal; 10 % is not.
_BINARY_CONTROL_RATIO = 0.10
_UTF8_BOM = b"\xef\xbb\xbf"
# UTF-32 marks first: the UTF-32-LE mark starts with the UTF-16-LE one.
_OTHER_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff", b"\xff\xfe", b"\xfe\xff")
_GLOB_MAGIC = re.compile(r"[*?[]")
# A reader yields (source, text, language, status); read_corpus numbers them.
_Record = tuple[str, "str | None", "str | None", str]
# Parquet rows per record batch: code documents average a few KiB, so a few MiB per batch.
_PARQUET_BATCH_ROWS = 512


@dataclass(frozen=True, slots=True)
class Document:
    """One corpus document.

    Attributes:
        doc: 0-based index in corpus order; stable across runs of the same corpus.
        source: the file path (relative to the glob's base directory for a relative glob, as
            matched for an absolute one), or the record's ``id_field`` value (``"file:line"`` for a
            JSONL record without one, ``"file:row"`` with a 0-based row for a Parquet row).
        text: the document's text, or None when it was skipped.
        language: from ``language_field`` when set and present, else from the file extension of
            ``source`` (see :data:`LANGUAGE_BY_EXTENSION`); None when unknown.
        status: ``"ok"``, or why the document was skipped (see the module docstring).
    """

    doc: int
    source: str
    text: str | None
    language: str | None
    status: str

    @property
    def ok(self) -> bool:
        """True when the document has text to tokenize."""
        return self.status == "ok"


def language_from_path(path: str) -> str | None:
    """The language of a file, from its name or extension; None when unknown.

    Args:
        path: a file path (only its last component is looked at).

    Returns:
        A lower-case language name such as ``"python"``, or None.
    """
    name = PurePath(path).name
    if name in LANGUAGE_BY_FILENAME:
        return LANGUAGE_BY_FILENAME[name]
    suffix = PurePath(name).suffix
    if not suffix:
        return None
    return LANGUAGE_BY_EXTENSION.get(suffix) or LANGUAGE_BY_EXTENSION.get(suffix.lower())


# Interpreter of a "#!" line -> language (version digits stripped: python3.12 -> python).
LANGUAGE_BY_INTERPRETER: dict[str, str] = {
    "sh": "shell",
    "bash": "shell",
    "dash": "shell",
    "ash": "shell",
    "ksh": "shell",
    "zsh": "shell",
    "fish": "fish",
    "python": "python",
    "pypy": "python",
    "perl": "perl",
    "ruby": "ruby",
    "node": "javascript",
    "nodejs": "javascript",
    "lua": "lua",
    "php": "php",
    "rscript": "r",
    "julia": "julia",
    "pwsh": "powershell",
    "tclsh": "tcl",
}
_SHEBANG = re.compile(r"#![ \t]*(\S+)(?:[ \t]+(\S+))?(?:[ \t]+(\S+))?")


def language_from_shebang(text: str) -> str | None:
    """The language a ``#!`` first line names (``#!/bin/sh``, ``#!/usr/bin/env python3``).

    For files without an extension, such as the scripts in ``/usr/bin``. ``env`` and its
    options (``env -S perl -w``) are skipped. None without a ``#!`` line or for an unknown
    interpreter.
    """
    m = _SHEBANG.match(text[:256])
    if m is None:
        return None
    words = [w for w in m.groups() if w]
    name = PurePath(words[0]).name
    if name == "env":
        rest = [w for w in words[1:] if not w.startswith("-")]
        if not rest:
            return None
        name = PurePath(rest[0]).name
    base = re.match(r"[a-z]+", name.lower())
    return None if base is None else LANGUAGE_BY_INTERPRETER.get(base.group(0))


def expand_globs(patterns: Sequence[str], base_dir: Path | None = None) -> list[tuple[str, Path]]:
    """Expand globs into a sorted, de-duplicated list of files.

    Relative globs resolve against ``base_dir`` (default: the current directory); ``**`` matches
    any number of directories. As with the shell, ``*`` does not match names starting with a dot,
    so ``.git/`` and other hidden entries are left out unless a glob names them. Directories are
    ignored.

    Args:
        patterns: the globs, e.g. ``["src/**/*.py", "/data/extra/*.rs"]``.
        base_dir: the directory relative globs resolve against.

    Returns:
        ``(source, path)`` pairs sorted by ``source``: ``source`` is the match relative to
        ``base_dir`` for a relative glob, as matched for an absolute one; ``path`` is usable to
        open the file. A file matched by several globs appears once, under its first match.

    Raises:
        CorpusError: a glob matches nothing, or only directories.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    by_file: dict[str, tuple[str, Path]] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if os.path.isabs(expanded):
            matches = glob.glob(expanded, recursive=True)
        else:
            # root_dir keeps matches relative to the base, so sources do not embed the machine's
            # absolute layout and stay comparable between machines.
            matches = glob.glob(expanded, root_dir=base, recursive=True)
        n_files = 0
        for match in matches:
            path = Path(match) if os.path.isabs(match) else base / match
            if path.is_dir():
                continue
            n_files += 1
            # One key per file however it was reached (two globs, "a/../b", "./b").
            key = os.path.normpath(os.path.abspath(path))
            by_file.setdefault(key, (os.path.normpath(match), path))
        if n_files == 0:
            raise CorpusError(_no_match_message(pattern, expanded, base, bool(matches)))
    return sorted(by_file.values(), key=lambda pair: pair[0])


def _no_match_message(pattern: str, expanded: str, base: Path, only_dirs: bool) -> str:
    """Say which directory a glob was resolved against, and whether its fixed part exists."""
    resolved_in = Path(expanded).anchor if os.path.isabs(expanded) else str(base.resolve())
    # The glob's fixed leading directories ("data/src" in "data/src/**/*.py"): when they do not
    # exist, that is the usual mistake (wrong base directory, typo), so say so.
    fixed = []
    for part in Path(expanded).parts[:-1]:
        if _GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    root = base.joinpath(*fixed) if fixed else base
    hint = ""
    if fixed and not root.is_dir():
        hint = f"; directory {root} does not exist"
    if only_dirs:
        what = "matches only directories"
        fix = f"match files, e.g. '{pattern.rstrip('/')}/**/*'"
    else:
        what = "matches no file"
        fix = (
            "check the directory and the pattern; use '**' to descend into subdirectories, "
            "e.g. 'src/**/*.py'"
        )
    return (
        f"corpus glob {pattern!r} {what} (resolved against {resolved_in}{hint}). "
        f"Fix corpus.paths: {fix}."
    )


def read_corpus(
    kind: str,
    paths: Sequence[str],
    *,
    text_field: str = "content",
    id_field: str = "path",
    language_field: str | None = None,
    base_dir: Path | None = None,
    max_doc_bytes: int = 8 << 20,
) -> Iterator[Document]:
    """Read a corpus lazily, one :class:`Document` at a time, in a deterministic order.

    The globs are expanded (and checked) when this function is called, before any document is
    read, so a typo in the last glob fails the job at once instead of after hours of work on the
    first ones; the documents themselves are read only as the iterator is consumed.

    Args:
        kind: ``"files"`` (each matched file is a document), ``"jsonl"`` (one JSON object per
            line, ``.gz`` compressed or not) or ``"parquet"`` (one row per document, read in record
            batches).
        paths: globs naming the files to read (relative globs resolve against ``base_dir``).
        text_field: the record field holding the document text (JSONL/Parquet).
        id_field: the record field used as ``source``; records without it get ``"file:line"``
            (JSONL, 1-based line) or ``"file:row"`` (Parquet, 0-based row).
        language_field: the record field holding the language; when None or absent, the language
            comes from the extension of ``source``.
        base_dir: the directory relative globs resolve against (default: the current directory).
        max_doc_bytes: documents larger than this (UTF-8 bytes) are skipped as ``"too large"``.

    Returns:
        An iterator over documents numbered from 0; skipped documents are included, with
        ``text=None``.

    Raises:
        CorpusError: an unknown ``kind``, no globs, a glob that matches nothing (all raised at
            call time); while iterating: a record without
            ``text_field`` or with a non-text value in it, a malformed JSON line, or a JSONL/Parquet
            file that cannot be opened.
    """
    if kind not in CORPUS_KINDS:
        raise CorpusError(
            f"unknown corpus kind {kind!r}. Fix corpus.kind: use one of {', '.join(CORPUS_KINDS)}."
        )
    if max_doc_bytes < 1:
        raise CorpusError(f"max_doc_bytes must be >= 1, got {max_doc_bytes}.")
    if isinstance(paths, str) or not paths:
        raise CorpusError(
            f"corpus.paths must be a non-empty list of globs, got {paths!r}. "
            "Fix corpus.paths, e.g. ['src/**/*.py']."
        )
    files = expand_globs(paths, base_dir)
    if kind == "files":
        records = _iter_files(files, max_doc_bytes)
    elif kind == "jsonl":
        records = _iter_jsonl(files, text_field, id_field, language_field, max_doc_bytes)
    else:
        records = _iter_parquet(files, text_field, id_field, language_field, max_doc_bytes)
    return _numbered(records)


def text_document(
    text: str, *, language: str | None, source: str = "<text>", max_doc_bytes: int = 8 << 20
) -> Document:
    """One text as document 0 of a corpus, checked exactly as a JSONL record's text is.

    A leading UTF-8 BOM is dropped; a text that is empty, binary, not valid UTF-8 or larger than
    ``max_doc_bytes`` gets that ``status`` (and no text), as it would in a corpus.
    """
    checked, status = _classify_text(text, max_doc_bytes)
    return Document(doc=0, source=source, text=checked, language=language, status=status)


def _numbered(records: Iterator[_Record]) -> Iterator[Document]:
    """Number reader records in order: the ``doc`` index."""
    for doc, (source, text, language, status) in enumerate(records):
        yield Document(doc=doc, source=source, text=text, language=language, status=status)


def _classify_bytes(data: bytes, max_doc_bytes: int) -> tuple[str | None, str]:
    """Decode raw bytes into text, or say why the document is skipped."""
    if len(data) > max_doc_bytes:
        return None, "too large"
    if data.startswith(_OTHER_BOMS):
        # UTF-16/32 text is full of NUL bytes; call it what it is rather than "binary".
        return None, "not utf-8"
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    if _looks_binary(data):
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not utf-8"
    if not text.strip():
        return None, "empty"
    return text, "ok"


def _classify_text(value: str | bytes | None, max_doc_bytes: int) -> tuple[str | None, str]:
    """Check a text value from a JSONL record or Parquet row (a string, bytes or null)."""
    if value is None:
        return None, "empty"
    if isinstance(value, bytes):
        return _classify_bytes(value, max_doc_bytes)
    try:
        # Strict encoding fails on lone surrogates: a "\ud800" JSON escape, or the invalid bytes
        # of a non-UTF-8 line that _iter_jsonl smuggled through with surrogateescape.
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        return None, "not utf-8"
    if len(data) > max_doc_bytes:
        return None, "too large"
    if value.startswith("\ufeff"):
        value = value[1:]
        data = data[len(_UTF8_BOM) :]
    if _looks_binary(data):
        return None, "binary"
    if not value.strip():
        return None, "empty"
    return value, "ok"


def _looks_binary(data: bytes) -> bool:
    """NUL bytes, or a high share of control bytes (C-speed: one ``translate`` pass)."""
    if not data or b"\x00" in data:
        return bool(data)
    n_control = len(data) - len(data.translate(None, _CONTROL_BYTES))
    return n_control > _BINARY_CONTROL_RATIO * len(data)


def _iter_files(files: list[tuple[str, Path]], max_doc_bytes: int) -> Iterator[_Record]:
    """Each file is one document."""
    for source, path in files:
        language = language_from_path(source)
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                # A FIFO or device would block or never end; it is no source file.
                yield source, None, language, "unreadable: not a regular file"
                continue
            # Check the size before reading, so a stray multi-GiB file costs nothing.
            if info.st_size > max_doc_bytes:
                yield source, None, language, "too large"
                continue
            with open(path, "rb") as handle:
                # Read one byte past the limit: the file may have grown since stat().
                data = handle.read(max_doc_bytes + 1)
        except OSError as exc:
            yield source, None, language, f"unreadable: {exc.strerror or exc}"
            continue
        text, status = _classify_bytes(data, max_doc_bytes)
        if language is None and text is not None:
            language = language_from_shebang(text)  # a script without an extension
        yield source, text, language, status


def _open_jsonl(path: Path) -> BinaryIO:
    """Open a JSONL file, decompressing ``.gz`` transparently."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _record_fields(
    record: dict[str, Any],
    where: str,
    fallback_id: str,
    text_field: str,
    id_field: str,
    language_field: str | None,
    max_doc_bytes: int,
) -> _Record:
    """Turn one JSONL record / Parquet row into a reader record, checking ``text_field``.

    ``where`` locates the record in error messages (``"file:line"``, ``"file row N"``);
    ``fallback_id`` is its ``source`` when the record has no ``id_field`` value.
    """
    if text_field not in record:
        fields = ", ".join(repr(name) for name in record) or "none"
        raise CorpusError(
            f"{where} has no field {text_field!r} (fields present: {fields}). "
            "Fix: set corpus.text_field to the field that holds the document text."
        )
    value = record[text_field]
    if value is not None and not isinstance(value, (str, bytes)):
        raise CorpusError(
            f"{where}: field {text_field!r} holds a value of type {type(value).__name__!r}, "
            "not text. Fix: set corpus.text_field to the field that holds the document text."
        )
    raw_id = record.get(id_field)
    source = fallback_id if raw_id is None else str(raw_id)
    language = None
    if language_field is not None:
        raw_language = record.get(language_field)
        language = None if raw_language is None else str(raw_language)
    if language is None:
        language = language_from_path(source)
    text, status = _classify_text(value, max_doc_bytes)
    if language is None and text is not None:
        language = language_from_shebang(text)
    return source, text, language, status


def _iter_jsonl(
    files: list[tuple[str, Path]],
    text_field: str,
    id_field: str,
    language_field: str | None,
    max_doc_bytes: int,
) -> Iterator[_Record]:
    """One JSON object per non-blank line; lines numbered from 1 like an editor does."""
    for source, path in files:
        try:
            handle = _open_jsonl(path)
        except OSError as exc:
            raise CorpusError(
                f"cannot open JSONL file {source}: {exc.strerror or exc}. Fix: check the file's "
                "permissions or remove it from corpus.paths."
            ) from exc
        with handle:
            try:
                for line_no, raw in enumerate(handle, start=1):
                    if line_no == 1 and raw.startswith(_UTF8_BOM):
                        raw = raw[len(_UTF8_BOM) :]
                    # surrogateescape keeps a line with invalid UTF-8 parseable: the bad bytes
                    # become lone surrogates in the text, and _classify_text marks that one
                    # document "not utf-8" instead of failing the whole file.
                    line = raw.decode("utf-8", "surrogateescape")
                    if not line.strip():
                        continue
                    where = f"{source}:{line_no}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CorpusError(
                            f"{where}: malformed JSON ({exc.msg} at column {exc.colno}). Fix the "
                            "line, or remove the file from corpus.paths; each line of a JSONL "
                            "file must be one JSON object."
                        ) from None
                    if not isinstance(record, dict):
                        raise CorpusError(
                            f"{where}: expected a JSON object, got a {type(record).__name__}. "
                            "Fix: each line of a JSONL file must be one JSON object with a "
                            f"{text_field!r} field."
                        )
                    yield _record_fields(
                        record, where, where, text_field, id_field, language_field, max_doc_bytes
                    )
            except (OSError, EOFError) as exc:
                # A truncated .gz or an I/O error mid-file: the file, not one record, is broken.
                raise CorpusError(
                    f"cannot read JSONL file {source}: {exc}. Fix: repair the file or remove it "
                    "from corpus.paths."
                ) from exc


def _iter_parquet(
    files: list[tuple[str, Path]],
    text_field: str,
    id_field: str,
    language_field: str | None,
    max_doc_bytes: int,
) -> Iterator[_Record]:
    """One row per document, read in record batches so a large file never sits in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for source, path in files:
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise CorpusError(
                f"cannot open Parquet file {source}: {exc}. Fix: repair the file or remove it "
                "from corpus.paths."
            ) from exc
        names = parquet.schema_arrow.names
        if text_field not in names:
            fields = ", ".join(repr(name) for name in names) or "none"
            raise CorpusError(
                f"{source} row 0 has no field {text_field!r} (fields present: {fields}). "
                "Fix: set corpus.text_field to the column that holds the document text."
            )
        # Read only the columns in use: a code dataset often carries large side columns.
        columns = [text_field]
        columns += [n for n in (id_field, language_field) if n in names and n != text_field]
        row = 0
        with parquet:
            try:
                for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                    values = {name: batch.column(name).to_pylist() for name in columns}
                    for i in range(batch.num_rows):
                        record = {name: values[name][i] for name in columns}
                        yield _record_fields(
                            record,
                            f"{source} row {row}",
                            f"{source}:{row}",
                            text_field,
                            id_field,
                            language_field,
                            max_doc_bytes,
                        )
                        row += 1
            except (OSError, pa.ArrowException) as exc:
                raise CorpusError(
                    f"cannot read Parquet file {source} at row {row}: {exc}. Fix: repair the "
                    "file or remove it from corpus.paths."
                ) from exc
