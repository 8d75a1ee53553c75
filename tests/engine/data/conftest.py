"""Fixtures of the data tests: a tokenizer trained in memory and a document factory."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from codelens.engine.data.corpus import Document

TRAINING_TEXTS = (
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    'fn main() { println!("hello"); }\n',
    "class Foo:\n    def __init__(self):\n        self.x = 1\n",
    "int main(void) { return 0; }\n",
)


@pytest.fixture(scope="session")
def training_texts() -> list[str]:
    """Small code snippets in four languages (what ``tokenizer`` was trained on)."""
    return list(TRAINING_TEXTS)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained in memory (nothing downloaded), with two traps: a
    post-processor that adds BOS, as many model tokenizers have, and a truncation setting in its
    tokenizer.json. Tokenization must honour neither."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(TRAINING_TEXTS) * 4, trainer)
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    backend.enable_truncation(max_length=8)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="session")
def make_doc() -> Callable[..., Document]:
    """``make_doc(i, text, status="ok")``: a Python document ``f{i}.py``."""

    def make(i: int, text: str | None, status: str = "ok") -> Document:
        return Document(doc=i, source=f"f{i}.py", text=text, language="python", status=status)

    return make
