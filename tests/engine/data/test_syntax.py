"""Code-aware tokens: byte spans, lines and syntax categories (engine/data/syntax.py), and their
columns in a real run's part files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from codelens.engine.data.corpus import LANGUAGE_BY_EXTENSION, LANGUAGE_BY_FILENAME
from codelens.engine.data.syntax import (
    CATEGORIES,
    WHITESPACE_MAX_CODEPOINT,
    char_categories,
    lexer_for,
    token_spans,
)
from codelens.engine.schemas import validate_spec
from codelens.engine.zoo.tiny_models import build_tiny_tokenizer
from codelens.workers.job import run_job

TRICKY = (
    'class Caf\u00e9:\r\n    """Docstring \u20ac with  spaces\n    and lines."""\n'
    "    def f(self, x=0x1F):\n"
    "        return print(x) and None  # \U0001f600 emoji \u4e2d\u6587\n"
    "\tlabel = 'tab\\tbed'\n"
)


def pieces(text: str, parts: list[str]) -> list[tuple[int, int]]:
    """Char offsets of ``parts``, which must concatenate to ``text``."""
    assert "".join(parts) == text
    out, at = [], 0
    for p in parts:
        out.append((at, at + len(p)))
        at += len(p)
    return out


def assert_tiles(text: str, spans) -> None:
    data = text.encode()
    assert spans.byte_start[0] == 0 and spans.byte_end[-1] == len(data)
    assert (spans.byte_start[1:] == spans.byte_end[:-1]).all(), "contiguous"
    assert (spans.byte_end >= spans.byte_start).all()
    assert (
        b"".join(data[s:e] for s, e in zip(spans.byte_start, spans.byte_end, strict=True)) == data
    )
    for s, line in zip(spans.byte_start.tolist(), spans.line.tolist(), strict=True):
        assert line == data[:s].count(b"\n") + 1


def test_category_rule_first_non_whitespace_character():
    text = 'def f(x):\n    return "a b"  # hi\n'
    parts = ["def", " f", "(", "x", "):", "\n   ", " return", ' "a', ' b"', "  #", " hi", "\n"]
    spans = token_spans(text, pieces(text, parts), "python")
    assert [CATEGORIES[c] for c in spans.category] == [
        "keyword",
        "name",
        "punctuation",
        "name",
        "punctuation",
        "whitespace",
        "keyword",
        "string",
        "string",
        "comment",
        "comment",
        "whitespace",
    ]
    assert spans.line.tolist() == [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert_tiles(text, spans)


def test_whitespace_inside_strings_and_comments_keeps_their_category():
    text = 'x = """\n    doc\n"""\nprint(self, 3.5, ValueError)\n'
    cats = char_categories(text, "python")
    inside = text.index("\n    doc")
    assert CATEGORIES[cats[inside]] == "string" and CATEGORIES[cats[inside + 1]] == "string"
    assert CATEGORIES[cats[1]] == "whitespace"  # the space in "x = "
    by_word = {
        w: CATEGORIES[cats[text.index(w)]] for w in ("print", "self", "3.5", "ValueError", "=")
    }
    assert by_word == {
        "print": "builtin",
        "self": "builtin",
        "3.5": "number",
        "ValueError": "builtin",
        "=": "operator",
    }


def test_unknown_language_reads_as_plain_text():
    text = "foo bar\n  baz"
    for language in (None, "text", "no-such-language"):
        assert lexer_for(language) is None
        names = [CATEGORIES[c] for c in char_categories(text, language)]
        assert set(names) == {"other", "whitespace"}
        assert [n == "whitespace" for n in names] == [c.isspace() for c in text]


def test_every_corpus_language_has_a_lexer():
    languages = set(LANGUAGE_BY_EXTENSION.values()) | set(LANGUAGE_BY_FILENAME.values())
    missing = sorted(lang for lang in languages - {"text"} if lexer_for(lang) is None)
    assert missing == []
    # A name from a corpus language_field that is a Pygments alias works too.
    assert lexer_for("JavaScript") is not None and lexer_for("c++") is not None
    assert CATEGORIES[char_categories("function f() {}", "javascript")[0]] == "keyword"


def test_whitespace_table_is_complete():
    assert chr(WHITESPACE_MAX_CODEPOINT).isspace()
    beyond = range(WHITESPACE_MAX_CODEPOINT + 1, 0x110000, 1)
    assert not any(chr(c).isspace() for c in beyond)


def _byte_level() -> Tokenizer:
    return Tokenizer.from_str(build_tiny_tokenizer().backend_tokenizer.to_str())


def _trimmed() -> Tokenizer:
    tok = _byte_level()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)  # RoBERTa-style offsets
    return tok


def _metaspace() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # SentencePiece-style "▁" word prefix
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=byte_tokens)
    tok.train_from_iterator([TRICKY.replace("\u20ac", "")] * 3, trainer=trainer)
    return tok


@pytest.mark.parametrize(
    "make", [_byte_level, _trimmed, _metaspace], ids=["bytelevel", "trimmed", "metaspace"]
)
def test_spans_tile_the_document_with_any_offsets(make):
    tok = make()
    enc = tok.encode(TRICKY, add_special_tokens=False)
    spans = token_spans(TRICKY, enc.offsets, "python")
    assert len(spans) == len(enc.ids)
    assert_tiles(TRICKY, spans)


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character map, reversed (what ByteLevel uses)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), 256),
    ]
    chars, extra = list(keep), 0
    byte_values = list(keep)
    for b in range(256):
        if b not in keep:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars, strict=True)}


def test_byte_level_spans_are_the_exact_bytes_rounded_to_characters():
    """Exact byte spans of byte-level BPE tokens (from their vocabulary strings), moved down to
    character boundaries, are the spans: a split character goes whole to its last piece."""
    tok = _byte_level()
    enc = tok.encode(TRICKY, add_special_tokens=False)
    spans = token_spans(TRICKY, enc.offsets, "python")
    decoder = _gpt2_byte_decoder()
    lengths = [len(t) for t in enc.tokens]  # one vocabulary character per byte
    assert b"".join(bytes(decoder[c] for c in t) for t in enc.tokens) == TRICKY.encode()
    exact_end = np.cumsum(lengths)
    exact_start = exact_end - lengths
    boundaries = np.cumsum([0] + [len(c.encode()) for c in TRICKY])

    def down(b):
        return boundaries[np.searchsorted(boundaries, b, side="right") - 1]

    assert (spans.byte_start == down(exact_start)).all()
    assert (spans.byte_end == down(exact_end)).all()
    empty = int((spans.byte_start == spans.byte_end).sum())
    assert empty >= 3, "the euro sign, the emoji and the CJK characters are split into byte tokens"


def test_run_writes_the_spans_of_each_token(tiny_model_dir, tmp_path, write_corpus, job_spec):
    files = {
        "tricky.py": TRICKY,
        "notes.unknownext": "plain words\nhere\n",
        "lib.js": "function add(a, b) {\n  return a + b; // sum\n}\n",
    }
    corpus = write_corpus(tmp_path / "corpus", files)
    spec = job_spec(
        tiny_model_dir("llama"),
        corpus,
        tmp_path / "run",
        glob="*",
        name="spans",
        tokens={"window": 24, "overlap": 4},  # several windows per document
        lens={"k": 2, "lookahead": [], "token_sets": {}},
        output={"shard_tokens": 30},
    )
    run_job(spec, show_progress=False)
    table = pq.read_table(tmp_path / "run" / "lens")
    field = table.schema.field("category")
    assert str(field.type) == "dictionary<values=string, indices=int8, ordered=0>"
    docs = {d["doc"]: d for d in pq.read_table(tmp_path / "run" / "docs.parquet").to_pylist()}
    rows = table.filter(table.column("layer").to_numpy() == 0).to_pydict()
    tok = build_tiny_tokenizer()
    for doc, info in docs.items():
        text = (corpus / info["source"]).read_bytes().decode()  # keeps the \r\n
        enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        want = token_spans(text, enc.offsets, info["language"])
        mine = [i for i, d in enumerate(rows["doc"]) if d == doc]
        order = sorted(mine, key=lambda i: rows["pos"][i])
        assert [rows["pos"][i] for i in order] == list(range(len(enc.ids)))
        for name in ("byte_start", "byte_end", "line"):
            assert [rows[name][i] for i in order] == getattr(want, name).tolist(), (doc, name)
        assert [rows["category"][i] for i in order] == [CATEGORIES[c] for c in want.category]
    languages = {Path(d["source"]).name: d["language"] for d in docs.values()}
    assert languages == {"lib.js": "javascript", "notes.unknownext": None, "tricky.py": "python"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    by_language = summary["layers"][0]["by_language"]
    assert set(by_language) == {"javascript", "python", "unknown"}
    plain = [rows["category"][i] for i, d in enumerate(rows["doc"]) if docs[d]["language"] is None]
    assert set(plain) <= {"other", "whitespace"}


def test_hand_made_windows_without_spans_write_nulls(tiny_loaded_model):
    from codelens.engine.data.windows import Shard, WindowTask
    from codelens.engine.run.runner import ShardRunner

    loaded = tiny_loaded_model("llama")
    spec = validate_spec(
        {
            "model": {"path": "unused", "device": "cpu"},
            "corpus": {"paths": ["unused"]},
            "lens": {"k": 2, "lookahead": [], "token_sets": {}},
        }
    )
    runner = ShardRunner(spec.lens, loaded, batch_tokens=spec.execution.batch_tokens)
    ids = loaded.tokenizer("x = 1\n", add_special_tokens=False)["input_ids"]
    targets = np.array([[t] for t in ids[1:]] + [[-1]], dtype=np.int32)
    table, partials = runner.run_shard(Shard(0, (WindowTask(0, tuple(ids), 0, targets),), len(ids)))
    for name in ("line", "byte_start", "byte_end", "category"):
        assert table.column(name).null_count == table.num_rows
    assert partials["0"]["by_category"] == {} and set(partials["0"]["by_language"]) == {"unknown"}
