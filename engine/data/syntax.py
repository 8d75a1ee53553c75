"""Code-aware tokens: each token's byte span, line and syntax category in its source document.

Computed at planning time, once per document, from the same single tokenizer pass that gives the
ids (:func:`codelens.engine.data.tokenize.tokenize_documents`), then sliced per window, so
workers (and Ray actors) receive them with the shard and never re-tokenize or re-lex.

**Spans.** The Rust tokenizer reports each token's character offsets. They are turned into spans
that *tile* the document (concatenating ``source[byte_start:byte_end]`` over positions gives the
document's UTF-8 bytes exactly), with these rules:

* token ``i`` starts at ``min(max(end of tokens < i), min(start of tokens >= i))`` (token 0 at 0)
  and ends where token ``i + 1`` starts; the last token ends at the end of the document;
* so a character that several tokens share (a multi-byte character that byte-level BPE splits into
  byte tokens, or a SentencePiece dummy-prefix ``▁`` reported over the first character) belongs
  whole to the *last* of them; the others get an empty span (``byte_start == byte_end``) at the
  character's start;
* characters no token's offsets cover (tokenizers that trim whitespace from offsets) belong to the
  following token, which is where byte-level BPE puts a leading space anyway.

Byte offsets are UTF-8 byte offsets into the document's text (after the UTF-8 BOM, which the corpus
reader strips). ``line`` is the 1-based line of the span's first character (``\\n`` ends a line;
a token that starts with a newline belongs to the line that newline ends; an empty span uses the
character at its position).

**Categories.** Pygments lexes the document (lexer chosen from :attr:`Document.language`, see
:data:`PYGMENTS_ALIASES`); each character gets the category of the lexer token holding it
(:data:`CATEGORIES`, mapping in :func:`category_of_token_type`), except that whitespace outside
string literals and comments is ``whitespace``. A token's category is that of the first character
of its span that is not ``whitespace``, or ``whitespace`` when all are (an empty span looks at the
one character at its position). A language with no Pygments lexer (or no language at all) is read
as plain text: whitespace is ``whitespace``, everything else ``other``; the lexer is never guessed
from the content, so the categories are a deterministic function of text and language.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES",
    "CATEGORY_CODE",
    "PYGMENTS_ALIASES",
    "TokenSpans",
    "category_of_token_type",
    "char_categories",
    "lexer_for",
    "token_spans",
]

CATEGORIES: tuple[str, ...] = (
    "keyword",
    "name",
    "builtin",
    "string",
    "number",
    "comment",
    "operator",
    "punctuation",
    "whitespace",
    "other",
)
"""Syntax categories; a category's index is its int8 code (the dictionary index in Parquet)."""

CATEGORY_CODE: dict[str, int] = {name: i for i, name in enumerate(CATEGORIES)}
_WS = CATEGORY_CODE["whitespace"]
_OTHER = CATEGORY_CODE["other"]
# Whitespace inside these stays with them: a docstring's indentation is part of the string.
_KEEPS_WHITESPACE = (CATEGORY_CODE["string"], CATEGORY_CODE["comment"])

PYGMENTS_ALIASES: dict[str, str] = {
    "python": "python",
    "cython": "cython",
    "c": "c",
    "cpp": "cpp",
    "cuda": "cuda",
    "objective-c": "objective-c",
    "objective-cpp": "objective-c++",
    "csharp": "csharp",
    "fsharp": "fsharp",
    "java": "java",
    "kotlin": "kotlin",
    "scala": "scala",
    "groovy": "groovy",
    "clojure": "clojure",
    "javascript": "javascript",
    "typescript": "typescript",
    "html": "html",
    "css": "css",
    "scss": "scss",
    "sass": "sass",
    "less": "less",
    "vue": "vue",
    "svelte": "html",  # no Svelte lexer: its files are HTML with script/style blocks
    "php": "php",
    "go": "go",
    "rust": "rust",
    "swift": "swift",
    "zig": "zig",
    "nim": "nim",
    "d": "d",
    "dart": "dart",
    "ruby": "ruby",
    "perl": "perl",
    "lua": "lua",
    "r": "r",
    "julia": "julia",
    "haskell": "haskell",
    "ocaml": "ocaml",
    "elixir": "elixir",
    "erlang": "erlang",
    "elm": "elm",
    "crystal": "crystal",
    "pascal": "delphi",
    "fortran": "fortran",
    "ada": "ada",
    "cobol": "cobol",
    "solidity": "solidity",
    "verilog": "verilog",
    "systemverilog": "systemverilog",
    "vhdl": "vhdl",
    "assembly": "gas",  # .s (GNU as) is the common case in code corpora
    "shell": "bash",
    "fish": "fish",
    "powershell": "powershell",
    "batch": "batch",
    "sql": "sql",
    "protobuf": "protobuf",
    "graphql": "graphql",
    "cmake": "cmake",
    "makefile": "make",
    "hcl": "terraform",
    "nix": "nix",
    "json": "json",
    "yaml": "yaml",
    "toml": "toml",
    "xml": "xml",
    "ini": "ini",
    "markdown": "markdown",
    "restructuredtext": "rst",
    "tex": "tex",
    "dockerfile": "docker",
    "starlark": "starlark",
}
"""Our language names (``codelens.engine.data.corpus``) -> Pygments lexer aliases. ``text`` is
absent on purpose: it is read as plain text. A language not listed here (e.g. from a corpus
``language_field``) is looked up as a Pygments alias, lower-cased; when that fails, plain text."""


@dataclass(frozen=True)
class TokenSpans:
    """Per-token source coordinates of consecutive tokens of one document.

    Attributes:
        byte_start: ``[n]`` int32: UTF-8 byte offset of the token's first byte.
        byte_end: ``[n]`` int32: one past its last byte (== ``byte_start`` for an empty span).
        line: ``[n]`` int32: 1-based line of the span's first character.
        category: ``[n]`` int8: index into :data:`CATEGORIES`.
        column: ``[n]`` int32: byte offset of ``byte_start`` from the start of its line (None
            when not computed).
    """

    byte_start: np.ndarray
    byte_end: np.ndarray
    line: np.ndarray
    category: np.ndarray
    column: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.byte_start.shape[0])

    def slice(self, start: int, stop: int) -> TokenSpans:
        """Tokens ``start .. stop - 1`` (copies, so a window does not pin its document's arrays)."""
        return TokenSpans(
            self.byte_start[start:stop].copy(),
            self.byte_end[start:stop].copy(),
            self.line[start:stop].copy(),
            self.category[start:stop].copy(),
            None if self.column is None else self.column[start:stop].copy(),
        )


def category_of_token_type(ttype: Any) -> int:
    """The category code of a Pygments token type (walks up to the first mapped ancestor).

    ``Operator.Word`` (``and``, ``not``, ``in``) counts as a keyword; ``Name.Builtin`` (with
    ``.Pseudo``: ``self``, ``cls``) and ``Name.Exception`` as builtin; ``Comment.Preproc``
    (``#include``) as keyword and ``Comment.PreprocFile`` (``<stdio.h>``) as string; ``Text`` and
    everything unmapped (``Generic``, ``Error``, ``Literal`` that is neither string nor number,
    ``Escape``, ``Other``) as other (its whitespace still counts as whitespace).
    """
    return _category_of_token_type(ttype)


@functools.cache
def _category_of_token_type(ttype: Any) -> int:
    from pygments import token as T

    # Most specific first: the first rule whose type contains ttype wins.
    rules = (
        (T.Operator.Word, "keyword"),
        (T.Comment.PreprocFile, "string"),
        (T.Comment.Preproc, "keyword"),
        (T.Name.Builtin, "builtin"),
        (T.Name.Exception, "builtin"),
        (T.Keyword, "keyword"),
        (T.Name, "name"),
        (T.Literal.String, "string"),
        (T.Literal.Number, "number"),
        (T.Comment, "comment"),
        (T.Operator, "operator"),
        (T.Punctuation, "punctuation"),
        (T.Text.Whitespace, "whitespace"),
        (T.Whitespace, "whitespace"),
    )
    for parent, name in rules:
        if ttype in parent:
            return CATEGORY_CODE[name]
    return _OTHER


@functools.cache
def lexer_for(language: str | None) -> Any | None:
    """The Pygments lexer for one of our language names, or None (read as plain text).

    Args:
        language: a language name (``Document.language``), or None.

    Returns:
        A cached lexer instance; None for no language, ``text``, or a name Pygments does not know.
    """
    if not language or language.lower() == "text":
        return None
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    alias = PYGMENTS_ALIASES.get(language, PYGMENTS_ALIASES.get(language.lower(), language.lower()))
    try:
        # No preprocessing options matter: get_tokens_unprocessed lexes the text exactly as given.
        return get_lexer_by_name(alias)
    except ClassNotFound:
        return None


WHITESPACE_MAX_CODEPOINT = 0x3000
"""The largest code point ``str.isspace`` accepts (IDEOGRAPHIC SPACE); tests check it."""


@functools.cache
def _whitespace_codepoints() -> np.ndarray:
    """Every code point ``str.isspace`` accepts (29 of them), sorted."""
    return np.array(
        [c for c in range(WHITESPACE_MAX_CODEPOINT + 1) if chr(c).isspace()], dtype=np.uint32
    )


def _codepoints(text: str) -> np.ndarray:
    # surrogatepass: a lone surrogate (possible in --text from argv) still counts as one character.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def char_categories(text: str, language: str | None) -> np.ndarray:
    """Category code of every character of ``text`` (see the module docstring).

    Args:
        text: the document.
        language: its language (``Document.language``), or None.

    Returns:
        ``[len(text)]`` int8.
    """
    cps = _codepoints(text)
    is_ws = np.isin(cps, _whitespace_codepoints())
    plain = np.where(is_ws, _WS, _OTHER).astype(np.int8)
    lexer = lexer_for(language)
    if lexer is None or not text:
        return plain
    try:
        lexed = list(lexer.get_tokens_unprocessed(text))
    except Exception as e:  # noqa: BLE001 - a lexer bug must not fail a corpus-scale job
        log.warning(
            "pygments %s lexer failed (%s: %s); reading the text as plain",
            lexer.name,
            type(e).__name__,
            e,
        )
        return plain
    m = len(lexed)
    starts = np.fromiter((i for i, _, _ in lexed), dtype=np.int64, count=m)
    lengths = np.fromiter((len(v) for _, _, v in lexed), dtype=np.int64, count=m)
    codes = np.fromiter((_category_of_token_type(t) for _, t, _ in lexed), dtype=np.int8, count=m)
    tiled = starts == np.concatenate(([0], np.cumsum(lengths)[:-1]))
    if lengths.sum() == len(text) and tiled.all():
        cats = np.repeat(codes, lengths)  # the usual case: lexer tokens tile the text
    else:
        cats = np.full(len(text), _OTHER, dtype=np.int8)  # gaps (rare lexers) stay 'other'
        for start, length, code in zip(starts, lengths, codes, strict=True):
            cats[start : start + length] = code
    # A visible character in a token typed as whitespace (a lexer quirk) is 'other'; whitespace
    # is 'whitespace' unless it sits inside a string literal or a comment.
    cats = np.where(~is_ws & (cats == _WS), np.int8(_OTHER), cats)
    cats = np.where(is_ws & ~np.isin(cats, _KEEPS_WHITESPACE), np.int8(_WS), cats)
    return cats.astype(np.int8)


def token_spans(text: str, offsets: Sequence[tuple[int, int]], language: str | None) -> TokenSpans:
    """Byte spans, lines and categories of a document's tokens (rules in the module docstring).

    Args:
        text: the document.
        offsets: the tokenizer's ``(start, end)`` character offsets, one pair per token.
        language: the document's language, or None.

    Returns:
        The tokens' spans.
    """
    n_chars = len(text)
    n = len(offsets)
    if n == 0:
        empty = np.zeros(0, dtype=np.int32)
        return TokenSpans(
            empty, empty.copy(), empty.copy(), np.zeros(0, dtype=np.int8), empty.copy()
        )
    off = np.asarray(offsets, dtype=np.int64).reshape(n, 2).clip(0, n_chars)
    covered_before = np.concatenate(([0], np.maximum.accumulate(off[:, 1])[:-1]))
    starts_after = np.minimum.accumulate(off[::-1, 0])[::-1]
    start = np.minimum(covered_before, starts_after)
    start[0] = 0
    end = np.concatenate((start[1:], [n_chars]))

    cps = _codepoints(text)
    utf8_len = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    char_to_byte = np.concatenate(([0], np.cumsum(utf8_len)))
    newlines_before = np.concatenate(([0], np.cumsum(cps == 0x0A)))
    # line_start[c]: the first character of the line holding character c (after the last '\n'
    # before c), by a running maximum over the characters following a newline.
    after_newline = np.where(
        np.concatenate(([True], cps[:-1] == 0x0A))[:n_chars], np.arange(n_chars), 0
    )
    line_start = np.append(np.maximum.accumulate(after_newline), n_chars)

    cats = char_categories(text, language)
    # next_solid[c]: the first character >= c whose category is not whitespace (n_chars if none),
    # by a reversed running minimum over the solid characters' indices.
    index = np.where(cats != _WS, np.arange(n_chars), n_chars)
    next_solid = np.append(np.minimum.accumulate(index[::-1])[::-1], n_chars)
    look_end = np.maximum(end, np.minimum(start + 1, n_chars))  # empty span: its one character
    first = next_solid[start]
    cats_ext = np.append(cats, np.int8(_WS))
    category = np.where(first < look_end, cats_ext[first], np.int8(_WS)).astype(np.int8)
    return TokenSpans(
        byte_start=char_to_byte[start].astype(np.int32),
        byte_end=char_to_byte[end].astype(np.int32),
        line=(1 + newlines_before[start]).astype(np.int32),
        category=category,
        column=(char_to_byte[start] - char_to_byte[line_start[start]]).astype(np.int32),
    )
