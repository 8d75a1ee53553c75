"""A programming language's keywords and builtins, read from its Pygments lexer.

The detour question (does a model writing Python put mass on JavaScript's tokens in its middle
layers?) needs "the tokens of language Y" as a token set. Pygments knows ~600 languages, and each
lexer lists its keywords and builtin names in the rules of its ``tokens`` table, either as
``words((...))`` or as a regex alternation ``\\b(if|else|while)\\b``, with the token type the rule
emits (``Keyword.*``, ``Name.Builtin.*``; through ``bygroups`` for some lexers). This module
collects the identifier-like words of the rules of one kind: what the lexer itself would colour
as a keyword (or builtin) of that language. No torch here: the engine's run layer encodes them.
"""

from __future__ import annotations

import functools
import re

WORD_KINDS = ("keywords", "builtins")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A leading alternation of plain words: \b(if|else)\b, (?:var|let)\b, (if|fi)(\s*)\b, ...
_ALTERNATION = re.compile(r"^(?:\\b)?\((?:\?:)?([A-Za-z0-9_|]+)\)")


class UnknownLanguageError(ValueError):
    """No Pygments lexer has this name or alias."""


def _token_types(action) -> tuple:
    """The token types a rule's action emits: the type itself, or ``bygroups``' group types."""
    if callable(action) and getattr(action, "__closure__", None):
        for cell in action.__closure__:
            contents = cell.cell_contents
            if isinstance(contents, tuple):
                return contents
        return ()
    return (action,)


def _rule_words(pattern) -> list[str]:
    """The plain words a rule's pattern matches: a ``words(...)`` list or a leading alternation."""
    from pygments.lexer import words

    if isinstance(pattern, words):
        return [w for w in pattern.words if _IDENTIFIER.fullmatch(w)]
    if isinstance(pattern, str):
        found = _ALTERNATION.match(pattern)
        if found:
            parts = found.group(1).split("|")
            if all(_IDENTIFIER.fullmatch(p) for p in parts):
                return parts
    return []


@functools.cache
def language_words(language: str, kind: str) -> tuple[str, ...]:
    """The ``kind`` (``"keywords"`` or ``"builtins"``) of ``language``, sorted and unique.

    Args:
        language: a Pygments lexer name or alias (``python``, ``javascript``, ``c``, ``perl``,
            ``bash``, ...), case-insensitive.
        kind: ``"keywords"`` (rules emitting ``Keyword`` and its subtypes, constants such as
            ``True`` and ``null`` included) or ``"builtins"`` (``Name.Builtin``).

    Raises:
        UnknownLanguageError: no lexer has that name; the message says where to find names.
        ValueError: an unknown ``kind``.
    """
    from pygments.lexers import get_lexer_by_name
    from pygments.token import Keyword, Name
    from pygments.util import ClassNotFound

    if kind not in WORD_KINDS:
        raise ValueError(f"kind must be one of {WORD_KINDS}, got {kind!r}")
    try:
        lexer = type(get_lexer_by_name(language.lower()))
    except ClassNotFound:
        raise UnknownLanguageError(
            f"Pygments knows no language {language!r}; use a lexer name or alias such as "
            "'python', 'javascript', 'c', 'perl' or 'bash' (`pygmentize -L lexers` lists them)"
        ) from None
    wanted = Keyword if kind == "keywords" else Name.Builtin
    found: set[str] = set()
    for cls in lexer.__mro__:
        for rules in cls.__dict__.get("tokens", {}).values():
            for rule in rules:
                if not (isinstance(rule, tuple) and len(rule) >= 2):
                    continue  # include(...), inherit, default(...)
                types = _token_types(rule[1])
                if types and types[0] is not None and types[0] in wanted:
                    found.update(_rule_words(rule[0]))
    return tuple(sorted(found))
