"""The lens section resolved against a model (engine/run/request.py): language token sets."""

from __future__ import annotations

import pytest

from codelens.engine.data.language_words import language_words
from codelens.engine.errors import SpecError
from codelens.engine.run.request import resolve_lens
from codelens.engine.schemas import LensSpec


def first_tokens(tokenizer, word: str) -> set[int]:
    """What a word counts as: its first token after a space and at a line start."""
    spaced = tokenizer.encode(" " + word, add_special_tokens=False)[0]
    at_line = [
        t
        for t in tokenizer.encode("\n" + word, add_special_tokens=False)
        if tokenizer.decode([t]).strip()
    ][0]
    return {spaced, at_line}


def resolve_sets(loaded, token_sets: dict):
    """The lens section with only these token sets, resolved against ``loaded``."""
    return resolve_lens(LensSpec(k=2, lookahead=[], token_sets=token_sets), loaded)


def test_language_sets_expand_to_their_words_and_report_overlaps(tiny_loaded_model):
    loaded = tiny_loaded_model("llama")
    tok = loaded.tokenizer
    sets = {
        "py": {"keywords": "python", "builtins": "python"},
        "c": {"keywords": "c"},
        "js": {"keywords": "javascript", "exclusive": True},
        "mine": ["def"],
    }
    lens = resolve_sets(loaded, sets)
    ids = lens.token_set_ids
    want_py = set().union(
        *(first_tokens(tok, w) for kind in ("keywords", "builtins")
          for w in language_words("python", kind))
    )  # fmt: skip
    assert set(ids["py"]) == want_py
    assert first_tokens(tok, "def") <= set(ids["py"]) and first_tokens(tok, "print") <= set(
        ids["py"]
    )
    assert first_tokens(tok, "struct") <= set(ids["c"])
    # Overlaps are reported ('if', 'for', 'return', ...), before the exclusive set drops its own.
    overlaps = lens.token_set_overlaps
    assert overlaps["py&c"] == len(set(ids["py"]) & set(ids["c"])) > 0
    assert overlaps["py&js"] > 0 and overlaps["c&js"] > 0 and overlaps["py&mine"] == 1
    js_words = set().union(
        *(first_tokens(tok, w) for w in language_words("javascript", "keywords"))
    )
    others = set(ids["py"]) | set(ids["c"]) | set(ids["mine"])
    assert set(ids["js"]) == js_words - others and ids["js"]
    # The kernels get the same ids.
    request_ids = {name: t.tolist() for name, t in lens.request.token_sets}
    assert request_ids == ids


def whole_tokens(tokenizer, word: str) -> set[int]:
    """What a word counts as with single_token: the spellings that are one token."""
    out = set()
    spaced = tokenizer.encode(" " + word, add_special_tokens=False)
    if len(spaced) == 1:
        out.add(spaced[0])
    at_line = [
        t
        for t in tokenizer.encode("\n" + word, add_special_tokens=False)
        if tokenizer.decode([t]).strip()
    ]
    if len(at_line) == 1 and tokenizer.decode(at_line) == word.strip():
        out.add(at_line[0])
    return out


def test_single_token_sets_leave_out_the_pieces_of_split_words(tiny_loaded_model):
    loaded = tiny_loaded_model("llama")
    tok = loaded.tokenizer
    sets = {"all": {"keywords": "c"}, "whole": {"keywords": "c", "single_token": True}}
    ids = resolve_sets(loaded, sets).token_set_ids
    words = language_words("c", "keywords")
    assert set(ids["whole"]) == set().union(*(whole_tokens(tok, w) for w in words))
    assert set(ids["whole"]) < set(ids["all"])  # split words add their first pieces to "all"
    for i in ids["whole"]:
        assert tok.decode([i]).strip() in words


def test_bad_language_sets_name_the_set_and_the_fix(tiny_loaded_model):
    loaded = tiny_loaded_model("llama")
    with pytest.raises(SpecError, match=r"lens.token_sets.x.keywords: Pygments knows no language"):
        resolve_lens(LensSpec(k=2, token_sets={"x": {"keywords": "klingon"}}), loaded)
    with pytest.raises(SpecError, match=r"lens.token_sets.x.builtins: .*lists no builtins"):
        resolve_lens(LensSpec(k=2, token_sets={"x": {"builtins": "javascript"}}), loaded)
    # The tiny tokenizer has no COBOL keyword as one whole token.
    with pytest.raises(SpecError, match=r"lens.token_sets.x: none of .* drop single_token: true"):
        resolve_lens(
            LensSpec(k=2, token_sets={"x": {"keywords": "cobol", "single_token": True}}), loaded
        )
    with pytest.raises(SpecError, match=r"lens.token_sets.b: every id is also in another set"):
        resolve_lens(
            LensSpec(
                k=2,
                token_sets={"a": {"keywords": "c"}, "b": {"keywords": "c", "exclusive": True}},
            ),
            loaded,
        )
