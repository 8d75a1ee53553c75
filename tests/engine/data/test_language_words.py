"""A language's keywords and builtins from its Pygments lexer (engine/data/language_words.py)."""

from __future__ import annotations

import pytest

from codelens.engine.data.language_words import UnknownLanguageError, language_words


@pytest.mark.parametrize(
    "language,kind,present,absent",
    [
        ("python", "keywords", {"def", "class", "return", "lambda", "True", "None"}, {"print"}),
        ("python", "builtins", {"print", "len", "range"}, {"def"}),
        ("javascript", "keywords", {"function", "const", "return", "null", "this"}, {"def"}),
        ("JS", "keywords", {"function"}, set()),  # aliases, any case
        ("c", "keywords", {"while", "struct", "typedef", "return"}, {"def", "function"}),
        ("perl", "keywords", {"my", "sub", "elsif", "unless"}, {"def"}),
        ("bash", "keywords", {"if", "then", "fi", "esac"}, {"def"}),  # bash's come via bygroups
        ("bash", "builtins", {"echo", "cd", "export"}, set()),
    ],
)
def test_words_of_a_language(language, kind, present, absent):
    words = language_words(language, kind)
    assert present <= set(words) and not absent & set(words)
    assert list(words) == sorted(set(words))
    assert all(w.isidentifier() for w in words)  # no regex fragments, no multi-word entries


def test_unknown_language_and_kind_are_named():
    with pytest.raises(UnknownLanguageError, match=r"no language 'klingon'.*pygmentize -L lexers"):
        language_words("klingon", "keywords")
    with pytest.raises(ValueError, match="kind must be one of"):
        language_words("python", "types")
