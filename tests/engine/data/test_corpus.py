"""Corpus readers: files globs, JSONL, Parquet, document statuses and corpus errors."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codelens.engine.data.corpus import (
    LANGUAGE_BY_EXTENSION,
    Document,
    expand_globs,
    language_from_path,
    language_from_shebang,
    read_corpus,
)
from codelens.engine.errors import CorpusError


@pytest.fixture
def tree(tmp_path: Path, write_corpus) -> Path:
    files = {
        "src/b.py": "def b():\n    return 2\n",
        "src/a.py": "print('a')\n",
        "src/pkg/c.rs": "fn main() {}\n",
        "src/pkg/d.py": "x = 1\n",
        "src/.hidden.py": "hidden = True\n",
        "src/Makefile": "all:\n\techo ok\n",
    }
    write_corpus(tmp_path, files)
    (tmp_path / "src/dir.py").mkdir()  # a directory whose name matches *.py
    return tmp_path


# --- files -------------------------------------------------------------------------------------


def test_files_sorted_deduplicated_relative_sources(tree: Path) -> None:
    docs = list(read_corpus("files", ["src/**/*.py", "src/*", "src/pkg/*.rs"], base_dir=tree))
    assert [d.source for d in docs] == [
        "src/Makefile",
        "src/a.py",
        "src/b.py",
        "src/pkg/c.rs",
        "src/pkg/d.py",
    ]
    assert [d.doc for d in docs] == list(range(5))
    assert all(d.status == "ok" and d.ok for d in docs)
    assert [d.language for d in docs] == ["makefile", "python", "python", "rust", "python"]
    assert docs[1].text == "print('a')\n"


def test_files_absolute_glob_and_cwd(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = list(read_corpus("files", [str(tree / "src" / "*.py")]))
    assert [d.source for d in absolute] == [str(tree / "src/a.py"), str(tree / "src/b.py")]
    monkeypatch.chdir(tree / "src")
    relative = list(read_corpus("files", ["*.py", "./a.py"]))
    # "./a.py" is the same file as "a.py": listed once, under its first match.
    assert [d.source for d in relative] == ["a.py", "b.py"]
    assert [d.source for d in read_corpus("files", ["./pkg/../a.py"])] == ["a.py"]


def test_files_explicit_hidden_and_literal_path(tree: Path) -> None:
    docs = list(read_corpus("files", ["src/.hidden.py", "src/a.py"], base_dir=tree))
    assert [d.source for d in docs] == ["src/.hidden.py", "src/a.py"]


def test_glob_matching_nothing_names_glob_and_directory(tree: Path) -> None:
    with pytest.raises(CorpusError) as info:
        read_corpus("files", ["src/**/*.py", "lib/**/*.go"], base_dir=tree)  # fails at call time
    message = str(info.value)
    assert "'lib/**/*.go'" in message
    assert str(tree.resolve()) in message
    assert f"directory {tree / 'lib'} does not exist" in message
    assert "corpus.paths" in message
    with pytest.raises(CorpusError) as info:
        expand_globs([str(tree / "src" / "*.java")])
    message = str(info.value)
    assert "matches no file (resolved against /)" in message
    assert "does not exist" not in message  # src/ exists: the pattern is what is wrong


def test_glob_matching_only_directories(tree: Path) -> None:
    with pytest.raises(CorpusError, match="only directories"):
        expand_globs(["src/pkg"], tree)


def test_unknown_kind_and_no_globs() -> None:
    with pytest.raises(CorpusError, match="files, jsonl, parquet"):
        read_corpus("csv", ["*.csv"])
    with pytest.raises(CorpusError, match="non-empty list of globs"):
        read_corpus("files", [])
    with pytest.raises(CorpusError, match="non-empty list of globs"):
        read_corpus("files", "src/*.py")


def test_document_statuses_do_not_stop_iteration(tmp_path: Path, write_corpus) -> None:
    files = {
        "01_ok.py": b"x = 1\n",
        "02_empty.py": b"",
        "03_blank.py": b"  \n\t\r\n",
        "04_latin1.py": "caf\u00e9 = 1\n".encode("latin-1"),
        "05_nul.bin": b"ELF\x00\x01\x02 header",
        "06_controls.dat": b"ab\x01\x02\x03\x04cd\x05\x06\x07\x08" * 10,
        "07_large.py": b"y = 2\n" * 100,
        "08_utf16.py": "x = 1\n".encode("utf-16"),
        "09_bom.py": b"\xef\xbb\xbfz = 3\n",
        "10_ansi.log": b"\x1b[31merror\x1b[0m: something went wrong in the build step\n" * 3,
        "11_ok.rs": "fn f() {} // caf\u00e9\n".encode(),
    }
    write_corpus(tmp_path, files)
    os.symlink(tmp_path / "missing-target", tmp_path / "12_broken.py")
    docs = list(read_corpus("files", ["*"], base_dir=tmp_path, max_doc_bytes=256))
    status = {d.source: d.status for d in docs}
    assert status == {
        "01_ok.py": "ok",
        "02_empty.py": "empty",
        "03_blank.py": "empty",
        "04_latin1.py": "not utf-8",
        "05_nul.bin": "binary",
        "06_controls.dat": "binary",
        "07_large.py": "too large",
        "08_utf16.py": "not utf-8",
        "09_bom.py": "ok",
        "10_ansi.log": "ok",
        "11_ok.rs": "ok",
        "12_broken.py": "unreadable: No such file or directory",
    }
    assert [d.doc for d in docs] == list(range(len(files) + 1))
    by_source = {d.source: d for d in docs}
    assert by_source["09_bom.py"].text == "z = 3\n"  # the UTF-8 BOM is stripped
    assert all(d.text is None for d in docs if d.status != "ok")
    assert by_source["11_ok.rs"].language == "rust"


def test_fifo_is_unreadable_not_blocking(tmp_path: Path, write_corpus) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "pipe.py")
    write_corpus(tmp_path, {"z.py": "ok = 1\n"})
    docs = list(read_corpus("files", ["*.py"], base_dir=tmp_path))
    assert [(d.source, d.status) for d in docs] == [
        ("pipe.py", "unreadable: not a regular file"),
        ("z.py", "ok"),
    ]


def test_deterministic_order(tree: Path) -> None:
    first = list(read_corpus("files", ["src/**/*"], base_dir=tree))
    second = list(read_corpus("files", ["src/**/*"], base_dir=tree))
    assert first == second
    assert all(isinstance(d, Document) for d in first)


def test_language_table() -> None:
    assert language_from_path("a/b/model.py") == "python"
    assert language_from_path("X.PY") == "python"
    assert language_from_path("kernel.cu") == "cuda"
    assert language_from_path("vec.C") == "cpp"
    assert language_from_path("lib.h") == "c"
    assert language_from_path("CMakeLists.txt") == "cmake"
    assert language_from_path("README") is None
    assert language_from_path("data.unknownext") is None
    assert all(ext.startswith(".") for ext in LANGUAGE_BY_EXTENSION)


@pytest.mark.parametrize(
    "first_line, language",
    [
        ("#!/bin/sh", "shell"),
        ("#! /bin/bash -e", "shell"),
        ("#!/usr/bin/env python3.12", "python"),
        ("#!/usr/bin/env -S perl -w", "perl"),
        ("#!/usr/bin/perl", "perl"),
        ("#!/usr/bin/env node", "javascript"),
        ("#!/usr/bin/env", None),
        ("#!/opt/bin/unknownlang", None),
        ("# not a shebang", None),
        ("", None),
    ],
)
def test_language_from_shebang(first_line: str, language: str | None) -> None:
    assert language_from_shebang(first_line + "\necho hi\n") == language


def test_a_script_without_an_extension_gets_its_language_from_its_shebang(
    tmp_path: Path, write_corpus
) -> None:
    write_corpus(
        tmp_path,
        {"bin/tool": "#!/bin/sh\necho hi\n", "bin/run.py": "#!/bin/sh\nx = 1\n", "bin/x": "hi\n"},
    )
    docs = {
        Path(d.source).name: d.language for d in read_corpus("files", ["bin/*"], base_dir=tmp_path)
    }
    # The extension wins over the shebang; no extension and no shebang: unknown.
    assert docs == {"tool": "shell", "run.py": "python", "x": None}


# --- JSONL -------------------------------------------------------------------------------------


def jsonl_lines(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def test_jsonl_fields_fallback_ids_and_languages(tmp_path: Path, write_corpus) -> None:
    write_corpus(
        tmp_path,
        {
            "data/part-0.jsonl": jsonl_lines(
                {"content": "def f(): pass\n", "path": "repo/f.py"},
                "",  # blank lines are not records, but they count as lines
                {"content": "fn g() {}\n"},
                {"content": "main = pure ()\n", "path": "x/Main.hs", "lang": "Haskell"},
                {"content": None, "path": "null.py"},
                {"content": "  \n", "path": 7},
            ),
        },
    )
    docs = list(read_corpus("jsonl", ["data/*.jsonl"], base_dir=tmp_path, language_field="lang"))
    assert [(d.doc, d.source, d.language, d.status) for d in docs] == [
        (0, "repo/f.py", "python", "ok"),
        (1, "data/part-0.jsonl:3", None, "ok"),
        (2, "x/Main.hs", "Haskell", "ok"),
        (3, "null.py", "python", "empty"),
        (4, "7", None, "empty"),
    ]
    assert docs[1].text == "fn g() {}\n"


def test_jsonl_custom_fields_and_gzip(tmp_path: Path, write_corpus) -> None:
    payload = jsonl_lines({"text": "a = 1\n", "id": "one.py"}, {"text": "b = 2\n", "id": "two.go"})
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(payload)
    write_corpus(tmp_path, {"a.jsonl": jsonl_lines({"text": "c = 3\n", "id": "three.rb"})})
    docs = list(
        read_corpus("jsonl", ["*.jsonl*"], base_dir=tmp_path, text_field="text", id_field="id")
    )
    assert [(d.source, d.language, d.text) for d in docs] == [
        ("three.rb", "ruby", "c = 3\n"),
        ("one.py", "python", "a = 1\n"),
        ("two.go", "go", "b = 2\n"),
    ]


def test_jsonl_missing_text_field(tmp_path: Path, write_corpus) -> None:
    write_corpus(
        tmp_path, {"c.jsonl": jsonl_lines({"content": "x"}, {"body": "y", "path": "p.py"})}
    )
    with pytest.raises(CorpusError) as info:
        list(read_corpus("jsonl", ["c.jsonl"], base_dir=tmp_path))
    message = str(info.value)
    assert "'content'" in message
    assert "c.jsonl:2" in message
    assert "'body', 'path'" in message
    assert "corpus.text_field" in message


def test_jsonl_non_text_value(tmp_path: Path, write_corpus) -> None:
    write_corpus(tmp_path, {"c.jsonl": jsonl_lines({"content": ["not", "text"]})})
    match = r"c\.jsonl:1: field 'content' holds a value of type 'list'"
    with pytest.raises(CorpusError, match=match):
        list(read_corpus("jsonl", ["c.jsonl"], base_dir=tmp_path))


def test_jsonl_malformed_line(tmp_path: Path, write_corpus) -> None:
    write_corpus(
        tmp_path, {"bad.jsonl": jsonl_lines({"content": "ok"}, '{"content": "unterminated')}
    )
    docs = read_corpus("jsonl", ["bad.jsonl"], base_dir=tmp_path)
    assert next(docs).status == "ok"  # records before the bad line are read
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: malformed JSON"):
        next(docs)


def test_jsonl_line_not_an_object(tmp_path: Path, write_corpus) -> None:
    write_corpus(tmp_path, {"list.jsonl": "[1, 2]\n"})
    with pytest.raises(CorpusError, match=r"list\.jsonl:1: expected a JSON object, got a list"):
        list(read_corpus("jsonl", ["list.jsonl"], base_dir=tmp_path))


def test_jsonl_document_statuses(tmp_path: Path, write_corpus) -> None:
    good = json.dumps({"content": "ok = 1\n", "path": "ok.py"}).encode()
    # Raw latin-1 bytes inside a JSON string: that record is not UTF-8, the file still reads.
    latin = b'{"content": "caf\xe9", "path": "latin.py"}'
    lines = [
        b"\xef\xbb\xbf" + good,  # a UTF-8 BOM at the start of the file
        latin,
        json.dumps({"content": "a\u0000b", "path": "nul.py"}).encode(),
        json.dumps({"content": "\ud800", "path": "surrogate.py"}).encode(),
        json.dumps({"content": "\ufeffbom = 1\n", "path": "bom.py"}).encode(),
        json.dumps({"content": "x" * 100, "path": "large.py"}).encode(),
        good,
    ]
    write_corpus(tmp_path, {"s.jsonl": b"\n".join(lines) + b"\n"})
    docs = list(read_corpus("jsonl", ["s.jsonl"], base_dir=tmp_path, max_doc_bytes=64))
    assert [(d.source, d.status) for d in docs] == [
        ("ok.py", "ok"),
        ("latin.py", "not utf-8"),
        ("nul.py", "binary"),
        ("surrogate.py", "not utf-8"),
        ("bom.py", "ok"),
        ("large.py", "too large"),
        ("ok.py", "ok"),
    ]
    assert docs[4].text == "bom = 1\n"


# --- Parquet -----------------------------------------------------------------------------------


def test_parquet_batches_fields_and_statuses(tmp_path: Path) -> None:
    n = 1300  # more than two record batches of 512 rows, across several row groups
    texts: list[str | None] = [f"v{i} = {i}\n" for i in range(n)]
    texts[5] = None
    texts[6] = "   "
    texts[7] = "a\x00b"
    table = pa.table(
        {
            "content": texts,
            "path": [f"f{i}.py" if i % 3 else None for i in range(n)],
            "stars": list(range(n)),
        }
    )
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=300)
    docs = list(read_corpus("parquet", ["p.parquet"], base_dir=tmp_path))
    assert [d.doc for d in docs] == list(range(n))
    assert [d.text for d in docs[:5]] == texts[:5]
    assert docs[0].source == "p.parquet:0"  # null id -> file:row
    assert (docs[1].source, docs[1].language) == ("f1.py", "python")
    assert [d.status for d in docs[5:8]] == ["empty", "empty", "binary"]
    assert docs[-1].text == f"v{n - 1} = {n - 1}\n"


def test_parquet_binary_text_column_and_no_id_column(tmp_path: Path) -> None:
    table = pa.table({"body": pa.array([b"ok = 1\n", b"\xff\xfe\xfa"], type=pa.binary())})
    pq.write_table(table, tmp_path / "b.parquet")
    docs = list(read_corpus("parquet", ["*.parquet"], base_dir=tmp_path, text_field="body"))
    assert [(d.source, d.status, d.text) for d in docs] == [
        ("b.parquet:0", "ok", "ok = 1\n"),
        ("b.parquet:1", "not utf-8", None),
    ]


def test_parquet_missing_text_field(tmp_path: Path) -> None:
    pq.write_table(pa.table({"code": ["x"], "path": ["a.py"]}), tmp_path / "m.parquet")
    with pytest.raises(CorpusError) as info:
        list(read_corpus("parquet", ["m.parquet"], base_dir=tmp_path))
    message = str(info.value)
    assert "'content'" in message and "m.parquet row 0" in message
    assert "'code', 'path'" in message and "corpus.text_field" in message


def test_parquet_non_text_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"content": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(CorpusError, match="holds a value of type 'int', not text"):
        list(read_corpus("parquet", ["i.parquet"], base_dir=tmp_path))


def test_parquet_corrupt_file(tmp_path: Path, write_corpus) -> None:
    write_corpus(tmp_path, {"x.parquet": b"not a parquet file at all"})
    with pytest.raises(CorpusError, match=r"cannot open Parquet file x\.parquet"):
        list(read_corpus("parquet", ["x.parquet"], base_dir=tmp_path))
