"""Tokenization, windows with overlap, targets and shard planning."""

from __future__ import annotations

import itertools
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from codelens.engine.corpus import Document
from codelens.engine.windows import (
    Shard,
    TokenizedDoc,
    Window,
    iter_windows,
    make_windows,
    plan_shards,
    target_columns,
    targets_for,
    tokenize_documents,
)

BOS = 999

TRAINING_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    'fn main() { println!("hello"); }\n',
    "class Foo:\n    def __init__(self):\n        self.x = 1\n",
    "int main(void) { return 0; }\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained in memory (nothing downloaded)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TRAINING_TEXT * 4, trainer)
    # A post-processor that adds BOS, as many model tokenizers have: tokenize_documents must not.
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    # A truncation setting in tokenizer.json must not cut documents.
    backend.enable_truncation(max_length=8)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")


def doc(i: int, text: str | None, status: str = "ok") -> Document:
    return Document(doc=i, source=f"f{i}.py", text=text, language="python", status=status)


# --- tokenization ------------------------------------------------------------------------------


def test_tokenize_matches_tokenizer_without_special_tokens(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    texts = TRAINING_TEXT + ["x = 'caf\u00e9' # \u00fcnicode \U0001f600\n" * 5, "a<bos>b"]
    docs = [doc(i, t) for i, t in enumerate(texts)]
    docs.insert(2, doc(len(texts), None, "binary"))
    out = list(tokenize_documents(docs, tokenizer, batch_size=3))
    assert [d for d, _ in out] == docs  # order kept, skipped documents passed through
    for document, ids in out:
        if document.text is None:
            assert ids is None
            continue
        expected = tokenizer(document.text, add_special_tokens=False)["input_ids"]
        assert ids == expected
        assert ids[0] != tokenizer.bos_token_id or document.text.startswith("<bos>")
        assert tokenizer.decode(ids) == document.text
    assert len(out[-2][1]) > 8  # not truncated


def test_tokenize_leaves_tokenizer_untouched_and_accepts_backend(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=4)
    docs = [doc(0, "def add(a, b):\n    return a + b\n")]
    [(_, ids)] = tokenize_documents(docs, backend)
    assert len(ids) > 4
    assert backend.truncation is not None and backend.truncation["max_length"] == 4
    assert backend.encode(docs[0].text, add_special_tokens=False).ids == ids[:4]


def test_tokenize_rejects_slow_tokenizer_and_bad_batch(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(TypeError, match="fast tokenizer"):
        tokenize_documents([doc(0, "x")], object())
    with pytest.raises(ValueError, match="batch_size"):
        tokenize_documents([doc(0, "x")], tokenizer, batch_size=0)


def test_tokenize_is_lazy(tokenizer: PreTrainedTokenizerFast) -> None:
    def endless():
        for i in itertools.count():
            yield doc(i, f"x{i} = {i}\n")

    first = list(itertools.islice(tokenize_documents(endless(), tokenizer, batch_size=4), 10))
    assert [d.doc for d, _ in first] == list(range(10))


# --- windows -----------------------------------------------------------------------------------


def check_windows(n: int, window: int, overlap: int, bos: int | None) -> list[Window]:
    ids = list(range(1000, 1000 + n))  # distinct ids: a slice check is a position check
    wins = make_windows(7, ids, window=window, overlap=overlap, bos_id=bos)
    emitted: list[int] = []
    for k, w in enumerate(wins):
        assert w.doc == 7
        assert 1 <= w.n_emit <= len(w.input_ids) <= window
        body = w.input_ids
        if bos is not None:
            assert body[0] == bos
            body = body[1:]
        # Carried context: none in the first window, exactly `overlap` tokens after it.
        context = 0 if k == 0 else overlap
        assert len(body) == context + w.n_emit
        assert body == ids[w.first_pos - context : w.first_pos + w.n_emit]
        assert w.emit_start == len(w.input_ids) - w.n_emit
        emitted.extend(range(w.first_pos, w.first_pos + w.n_emit))
    assert emitted == list(range(n))  # every position exactly once, in order
    if n:
        # Windows are as full as allowed except the last one.
        assert all(len(w.input_ids) == window for w in wins[:-1])
    return wins


def test_windows_property_over_many_settings() -> None:
    combos = 0
    for bos in (None, BOS):
        for window in range(2 + (bos is not None), 11):
            capacity = window - (bos is not None)
            for overlap in range(capacity):
                for n in (*range(0, 25), 57, 100):
                    check_windows(n, window, overlap, bos)
                    combos += 1
    assert combos > 2000


def test_windows_random_large() -> None:
    rng = random.Random(0)
    for _ in range(50):
        bos = rng.choice([None, BOS])
        window = rng.randint(3, 300)
        overlap = rng.randint(0, window - 2 - (bos is not None))
        check_windows(rng.randint(0, 5000), window, overlap, bos)


def test_windows_example_from_docstring() -> None:
    wins = make_windows(0, list(range(15)), window=8, overlap=2, bos_id=BOS)
    assert [(w.input_ids, w.first_pos, w.n_emit) for w in wins] == [
        ([BOS, 0, 1, 2, 3, 4, 5, 6], 0, 7),
        ([BOS, 5, 6, 7, 8, 9, 10, 11], 7, 5),
        ([BOS, 10, 11, 12, 13, 14], 12, 3),
    ]


@pytest.mark.parametrize(
    ("window", "overlap", "bos", "match"),
    [
        (1, 0, None, "window must be >= 2"),
        (2, 0, BOS, "window must be >= 3"),
        (4, 4, None, "overlap must be in 0..3"),
        (4, 3, BOS, "overlap must be in 0..2"),
        (4, -1, None, "overlap must be in 0..3"),
    ],
)
def test_window_validation(window: int, overlap: int, bos: int | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_windows(0, [1, 2, 3], window=window, overlap=overlap, bos_id=bos)


def test_iter_windows_skips_documents_without_tokens() -> None:
    tokenized = [(doc(0, "a"), [1, 2, 3]), (doc(1, None, "empty"), None), (doc(2, "b"), [4, 5])]
    wins = list(iter_windows(tokenized, window=2, overlap=0, bos_id=None))
    assert [(w.doc, w.input_ids) for w in wins] == [(0, [1, 2]), (0, [3]), (2, [4, 5])]
    with pytest.raises(ValueError, match="overlap"):
        iter_windows(tokenized, window=2, overlap=2, bos_id=None)


# --- targets -----------------------------------------------------------------------------------


def test_targets_across_windows_with_lookahead() -> None:
    rng = random.Random(1)
    for n, window, overlap, bos in [(1, 2, 0, None), (13, 4, 1, BOS), (40, 7, 3, None)]:
        tokenized = TokenizedDoc(doc=3, ids=[rng.randrange(50_000) for _ in range(n)])
        offsets = (2, 3, 5)
        rows: list[list[int]] = []
        for w in make_windows(3, tokenized.ids, window=window, overlap=overlap, bos_id=bos):
            window_rows = targets_for(tokenized.ids, w.first_pos, w.n_emit, offsets)
            columns = target_columns(tokenized.ids, w.first_pos, w.n_emit, offsets)
            # The same values, transposed.
            assert [list(r) for r in zip(*columns, strict=True)] == window_rows
            rows.extend(window_rows)
        x = tokenized.ids
        expected = [[x[i + o] if i + o < n else -1 for o in (1, *offsets)] for i in range(n)]
        assert rows == expected
        assert rows[-1][0] == -1  # the document's last token has no target


def test_targets_without_offsets_and_validation() -> None:
    assert targets_for([5, 6, 7], 1, 2, []) == [[7], [-1]]
    assert targets_for([5, 6, 7], 0, 0, [2]) == []
    assert target_columns([5, 6, 7], 0, 0, [2]) == [[], []]
    assert target_columns((5, 6, 7), 0, 3, [2]) == [[6, 7, -1], [7, -1, -1]]
    with pytest.raises(ValueError, match="offsets must be >= 1"):
        targets_for([5, 6, 7], 0, 1, [0])
    with pytest.raises(ValueError, match="outside a document of 3 tokens"):
        targets_for([5, 6, 7], 2, 2, [])


# --- shards ------------------------------------------------------------------------------------


def corpus_windows(seed: int = 0) -> list[Window]:
    rng = random.Random(seed)
    wins: list[Window] = []
    for d in range(40):
        n = rng.choice([0, 1, 5, 30, 200, 1000])
        wins += make_windows(d, list(range(n)), window=64, overlap=8, bos_id=BOS)
    return wins


@pytest.mark.parametrize("shard_tokens", [1, 50, 63, 500, 10**9])
def test_plan_shards_covers_all_windows_in_order(shard_tokens: int) -> None:
    wins = corpus_windows()
    shards = list(plan_shards(iter(wins), shard_tokens))
    assert [s.index for s in shards] == list(range(len(shards)))
    assert [w for s in shards for w in s.windows] == wins
    for s in shards:
        assert isinstance(s, Shard) and s.windows
        assert s.n_tokens == sum(w.n_emit for w in s.windows)
        # Overshoot is less than the last window's emitted tokens.
        assert s.n_tokens - s.windows[-1].n_emit < shard_tokens
    for s in shards[:-1]:
        assert s.n_tokens >= shard_tokens
    assert shards[-1].n_tokens <= shard_tokens + 63


def test_plan_shards_deterministic_and_doc_spans_shards() -> None:
    first = list(plan_shards(corpus_windows(), 100))
    second = list(plan_shards(iter(corpus_windows()), 100))
    assert first == second
    docs_per_shard = [{w.doc for w in s.windows} for s in first]
    spanning = [d for d in range(40) if sum(d in ds for ds in docs_per_shard) > 1]
    assert spanning  # long documents continue in the next shard


def test_plan_shards_edge_cases() -> None:
    assert list(plan_shards([], 10)) == []
    with pytest.raises(ValueError, match="shard_tokens must be >= 1"):
        plan_shards(corpus_windows(), 0)


def test_end_to_end_tokens_to_shards(tokenizer: PreTrainedTokenizerFast) -> None:
    docs = [doc(i, t) for i, t in enumerate(TRAINING_TEXT * 3)]
    docs.append(doc(len(docs), None, "empty"))
    tokenized = list(tokenize_documents(docs, tokenizer))
    shards = list(
        plan_shards(iter_windows(tokenized, window=8, overlap=2, bos_id=tokenizer.bos_token_id), 20)
    )
    total = sum(len(ids) for _, ids in tokenized if ids is not None)
    assert sum(s.n_tokens for s in shards) == total
    rows = {(w.doc, w.first_pos + j) for s in shards for w in s.windows for j in range(w.n_emit)}
    assert len(rows) == total
