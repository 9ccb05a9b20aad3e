"""Text for the text components: a tokenizer and a vocabulary that travels in the model file.

Words are lower-cased runs of letters (any script), digits, "_" and apostrophes; everything
else separates them (so "kitchen." and "Kitchen" are the same word). Id 0 is padding and
id 1 stands for every word the vocabulary does not know, so unknown words never stop a write
or a query.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from memnet.config import ConfigValueError
from memnet.errors import InvalidInput

PAD, UNKNOWN = "<pad>", "<unk>"
_WORD = re.compile(r"[\w']+")


def tokenize(text: str) -> list[str]:
    """'Where is Mary?' -> ['where', 'is', 'mary']."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word <-> id. ``words[0]`` is padding and ``words[1]`` the unknown word."""

    def __init__(self, words: Sequence[str]) -> None:
        if list(words[:2]) != [PAD, UNKNOWN]:
            raise ConfigValueError(
                f"a vocabulary must start with {PAD!r} and {UNKNOWN!r}, got {list(words[:2])}"
            )
        for word in words:
            if not isinstance(word, str) or not word:
                raise ConfigValueError(f"vocabulary words must be non-empty strings, got {word!r}")
        self.words = list(words)
        self.ids = {word: i for i, word in enumerate(self.words)}
        if len(self.ids) != len(self.words):
            raise ConfigValueError("the vocabulary lists a word twice")

    @classmethod
    def build(cls, texts: Iterable[str]) -> Vocabulary:
        """Every word of the texts, sorted (so the same data gives the same vocabulary)."""
        seen = {word for text in texts for word in tokenize(text)} - {PAD, UNKNOWN}
        return cls([PAD, UNKNOWN, *sorted(seen)])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, length: int) -> np.ndarray:
        """The word ids of text, padded with 0 to ``length`` [L] int32; raises InvalidInput
        for text without words or with more than ``length`` words."""
        if not isinstance(text, str):
            raise InvalidInput(f"this model reads text, got {type(text).__name__}")
        words = tokenize(text)
        if not words:
            raise InvalidInput("text has no words")
        if len(words) > length:
            raise InvalidInput(f"text has {len(words)} words; this model reads at most {length}")
        row = np.zeros(length, np.int32)
        row[: len(words)] = [self.ids.get(word, 1) for word in words]
        return row

    def unknown(self, text: str) -> list[str]:
        """The words of text this vocabulary does not know."""
        return [word for word in tokenize(text) if word not in self.ids]
