"""bAbI questions as fixed-shape arrays: each question with the memory its story has built
by then, exactly as a worker holds it (the most recent ``slots`` statements, with ages)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from memnet.babi import Story
from memnet.text import Vocabulary, tokenize


class Examples(NamedTuple):  # a NamedTuple is a JAX pytree: batches go straight into jit
    memory: np.ndarray  # [N, S, L] word ids of the statements in memory (0 = empty)
    filled: np.ndarray  # [N, S] bool
    age: np.ndarray  # [N, S] writes since each slot was written (0 = the latest)
    question: np.ndarray  # [N, L]
    answer: np.ndarray  # [N] class index, -1 for an answer the model does not know
    support: np.ndarray  # [N, hops] memory position the attention of each hop should pick

    def count(self) -> int:
        return len(self.answer)

    def take(self, index: np.ndarray) -> Examples:
        return Examples(*(a[index] for a in self))


def longest_text(stories: list[Story]) -> int:
    return max(
        len(tokenize(text))
        for story in stories
        for text in story.statements + [q.text for q in story.questions]
    )


def build(
    stories: list[Story],
    vocabulary: Vocabulary,
    answers: list[str],
    slots: int,
    length: int,
    hops: int,
) -> Examples:
    """Hop h is supervised with supporting fact h (facts in the file's order, the order
    reasoning needs them); later hops are free, and a fact that fell out of memory is not
    supervised."""
    classes = {a: i for i, a in enumerate(answers)}
    rows: dict[str, list[np.ndarray]] = {f: [] for f in Examples._fields}
    for story in stories:
        encoded = [vocabulary.encode(s, length) for s in story.statements]
        for q in story.questions:
            start = max(0, q.after - slots)
            n = q.after - start
            memory = np.zeros((slots, length), np.int32)
            if n:
                memory[:n] = encoded[start : q.after]
            age = np.zeros(slots, np.int32)
            age[:n] = np.arange(n - 1, -1, -1)
            support = np.full(hops, -1, np.int32)
            for h, fact in enumerate(q.support[:hops]):
                if fact >= start:
                    support[h] = fact - start
            rows["memory"].append(memory)
            rows["filled"].append(np.arange(slots) < n)
            rows["age"].append(age)
            rows["question"].append(vocabulary.encode(q.text, length))
            rows["answer"].append(np.int32(classes.get(q.answer, -1)))
            rows["support"].append(support)
    return Examples(**{f: np.stack(v) for f, v in rows.items()})
