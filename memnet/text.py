"""Text for the text components: a tokenizer and a vocabulary that travels in the model file.

Words are lower-cased runs of letters (any script, with their combining accents), digits and
"_", joined by apostrophes inside a word ("john's"); everything else separates them (so
"kitchen.", "'Kitchen'" and "Kitchen" are the same word). Text that is not ASCII is first
brought to one form: NFKC (a composed "ë" and "e" + U+0308 are one letter, fullwidth letters
are letters), typographic apostrophes become "'", and invisible format characters (a soft
hyphen, a zero-width space pasted from a web page) are dropped, so none of them splits a word
or makes it unknown. Id 0 is padding and id 1 stands for every word the vocabulary does not
know, so unknown words never stop a write or a query.

worker/events.py counts words the same way (a copy: the clients import no memnet); a test
holds the two together.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from memnet.config import ConfigValueError
from memnet.errors import InvalidInput

PAD, UNKNOWN = "<pad>", "<unk>"
log = logging.getLogger(__name__)
_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"  # combining
_WORD = re.compile(rf"\w[\w{_MARKS}]*(?:'\w[\w{_MARKS}]*)*")
_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\uff07": "'"})


def normal(text: str) -> str:
    """text in the one form words are read from (the module's docstring): lower case; NFKC,
    "'" for typographic apostrophes and no format characters (category Cf) where not ASCII."""
    if text.isascii():
        return text.lower()
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    return "".join(c for c in text if unicodedata.category(c) != "Cf").lower()


def tokenize(text: str) -> list[str]:
    """'Where is Mary?' -> ['where', 'is', 'mary']."""
    return _WORD.findall(normal(text))


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
        unreachable = [word for word in words[2:] if tokenize(word) != [word]]
        if unreachable:  # (a model trained before 2026-12-07 on quoted words, "'tis"; or a
            log.warning(  # hand-made file): served, but those words' ids are never used
                "the vocabulary has %d words no text reads as such (e.g. %s: quoted, "
                "capitalised or joined); text maps them to other words or <unk>: retrain "
                "the model to use them",
                len(unreachable),
                ", ".join(f"{w!r} reads as {tokenize(w)}" for w in unreachable[:3]),
            )
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
