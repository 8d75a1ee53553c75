"""One tokenizer pass (engine/data/tokenize.py): ids as the tokenizer gives them without special
tokens, and the same ids with each token's spans."""

from __future__ import annotations

import itertools

import pytest
from tokenizers import Tokenizer

from codelens.engine.data.corpus import Document
from codelens.engine.data.syntax import CATEGORIES
from codelens.engine.data.tokenize import tokenize_documents
from codelens.engine.zoo.tiny_models import build_tiny_tokenizer

TRICKY = (
    'class Caf\u00e9:\r\n    """Docstring \u20ac with  spaces\n    and lines."""\n'
    "    def f(self): pass\n"
)


def test_tokenize_matches_tokenizer_without_special_tokens(tokenizer, make_doc, training_texts):
    texts = training_texts + ["x = 'caf\u00e9' # \u00fcnicode \U0001f600\n" * 5, "a<bos>b"]
    docs = [make_doc(i, t) for i, t in enumerate(texts)]
    docs.insert(2, make_doc(len(texts), None, "binary"))
    out = list(tokenize_documents(docs, tokenizer, batch_size=3))
    assert [d for d, _, _ in out] == docs  # order kept, skipped documents passed through
    for document, ids, spans in out:
        assert spans is None
        if document.text is None:
            assert ids is None
            continue
        expected = tokenizer(document.text, add_special_tokens=False)["input_ids"]
        assert ids == expected
        assert ids[0] != tokenizer.bos_token_id or document.text.startswith("<bos>")
        assert tokenizer.decode(ids) == document.text
    assert len(out[-2][1]) > 8  # not truncated


def test_tokenize_leaves_tokenizer_untouched_and_accepts_backend(tokenizer, make_doc):
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=4)
    docs = [make_doc(0, "def add(a, b):\n    return a + b\n")]
    [(_, ids, _)] = tokenize_documents(docs, backend)
    assert len(ids) > 4
    assert backend.truncation is not None and backend.truncation["max_length"] == 4
    assert backend.encode(docs[0].text, add_special_tokens=False).ids == ids[:4]


def test_tokenize_rejects_slow_tokenizer_and_bad_batch(tokenizer, make_doc):
    with pytest.raises(TypeError, match="fast tokenizer"):
        tokenize_documents([make_doc(0, "x")], object())
    with pytest.raises(ValueError, match="batch_size"):
        tokenize_documents([make_doc(0, "x")], tokenizer, batch_size=0)


def test_tokenize_is_lazy(tokenizer, make_doc):
    def endless():
        for i in itertools.count():
            yield make_doc(i, f"x{i} = {i}\n")

    first = list(itertools.islice(tokenize_documents(endless(), tokenizer, batch_size=4), 10))
    assert [d.doc for d, _, _ in first] == list(range(10))


def test_spans_come_with_the_same_ids_in_one_pass():
    tok = build_tiny_tokenizer()
    docs = [
        Document(0, "a.py", TRICKY, "python", "ok"),
        Document(1, "b.bin", None, None, "binary"),
        Document(2, "c.js", "const x = 1;\n", "javascript", "ok"),
    ]
    mine = list(tokenize_documents(docs, tok, spans=True, batch_size=2))
    theirs = list(tokenize_documents(docs, tok, batch_size=2))
    assert [(d.doc, ids) for d, ids, _ in mine] == [(d.doc, ids) for d, ids, _ in theirs]
    assert mine[1][2] is None
    assert CATEGORIES[mine[2][2].category[0]] == "keyword"
    assert len(mine[0][2]) == len(mine[0][1])
