"""Tokenizer, vocabulary and the text components: edge cases, unknown words, bad input."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from memnet import Engine, InvalidInput, ModelConfig, load_model, random_model, save_model
from memnet.config import ConfigValueError
from memnet.errors import ModelFileError
from memnet.text import Vocabulary, tokenize
from worker.events import words_in


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("Where is Mary?") == ["where", "is", "mary"]
    assert tokenize("John's apple,milk  \t done.") == ["john's", "apple", "milk", "done"]
    assert tokenize("  ...?! ") == []
    assert tokenize("Ünïcode, ok") == ["ünïcode", "ok"]


SAME_WORDS = [  # each reads as "mary" / "where is mary" as a model's vocabulary holds them
    ("Where is 'Mary'?", "Where is Mary?"),  # quotes are not part of a word
    ("Where is \u2018Mary\u2019?", "Where is Mary?"),
    ("Where is Ma\u00adry?", "Where is Mary?"),  # a soft hyphen pasted from a web page
    ("Where is Ma\u200bry?", "Where is Mary?"),  # a zero-width space
    ("Where is \uff2d\uff41\uff52\uff59?", "Where is Mary?"),  # fullwidth letters
    ("Zoe\u0308lla left", "Zo\u00eblla left"),  # decomposed and composed "ë"
    ("Mary\u2019s apple", "Mary's apple"),
]


@pytest.mark.parametrize(("text", "same_as"), SAME_WORDS)
def test_quotes_invisible_characters_and_unicode_forms_do_not_change_words(text, same_as):
    assert tokenize(text) == tokenize(same_as)
    assert tokenize("''  ' ") == [] and tokenize("rock'n'roll") == ["rock'n'roll"]


@pytest.mark.parametrize(
    "text",
    [
        *(t for pair in SAME_WORDS for t in pair),
        "''",
        "a_b __ x'y'",
        "\u0130STANBUL \u00df",
        "\u0301\u0301 x",
        "1\u00b2 \u0663\u0664",
        "e\u0301\u200d\u0301 s\u200cs",
        "\u0149 \u02bcn x\u02bcy",
    ],
)
def test_the_clients_word_count_is_memnets(text):
    assert words_in(text) == len(tokenize(text))


def test_a_vocabulary_word_no_text_could_reach_is_named_at_load(caplog):
    """Served (a model trained before the tokenizer changed may hold "'tis"), with a warning
    naming such words; reachable ones, accented or with inner apostrophes, are silent."""
    for word in ["Mary", "kitchen.", "'tis", "two words"]:
        with caplog.at_level(logging.WARNING, logger="memnet.text"):
            caplog.clear()
            Vocabulary(["<pad>", "<unk>", "mary", word])
        assert "1 words no text reads as such" in caplog.text and repr(word) in caplog.text
    caplog.clear()
    vocabulary = Vocabulary(["<pad>", "<unk>", "mary's", "zo\u00eblla", "n"])
    assert not caplog.text
    assert vocabulary.encode("ZOE\u0308LLA", 2)[0] == 3
    assert tokenize("\u0149") == tokenize("\u02bcn") == tokenize("'n") == ["n"]  # (NFKC first)


def test_vocabulary_is_deterministic_and_reserves_padding_and_unknown():
    a = Vocabulary.build(["Mary went home.", "John went out"])
    b = Vocabulary.build(["John went out", "mary WENT home"])
    assert a.words == b.words == ["<pad>", "<unk>", "home", "john", "mary", "out", "went"]
    row = a.encode("Mary went to Paris", 6)
    assert row.dtype == np.int32 and row.shape == (6,)
    assert row.tolist() == [a.ids["mary"], a.ids["went"], 1, 1, 0, 0]  # unknown -> 1, pad 0
    assert a.unknown("Mary went to Paris") == ["to", "paris"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "no words"), ("?!", "no words"), ("a b c d e f g", "at most 6"), (3, "reads text")],
)
def test_vocabulary_refuses_text_it_cannot_encode(text, message):
    with pytest.raises(InvalidInput, match=message):
        Vocabulary(["<pad>", "<unk>", "a"]).encode(text, 6)


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["a", "b"], "must start"),
        (["<pad>", "<unk>", "a", "a"], "twice"),
        (["<pad>", "<unk>", ""], "non-empty"),
    ],
)
def test_bad_vocabularies_are_refused(words, message):
    with pytest.raises(ConfigValueError, match=message):
        Vocabulary(words)


def text_config(**options):
    return ModelConfig(
        input_dim=6, memory_dim=8, output_dim=3, hidden=4, slots=5, top_k=5,
        encoder="position-bow", generalizer="append-only", output="multi-hop", response="answer",
        options={"vocabulary": ["<pad>", "<unk>", "mary", "went", "home", "where", "is"],
                 "answers": ["home", "garden", "apple,milk"], "hops": 2, **options},
    )  # fmt: skip


def test_text_model_round_trips_with_its_vocabulary(tmp_path):
    path = tmp_path / "text.safetensors"
    save_model(random_model(text_config(), seed=1), path)
    model = load_model(path)
    assert model.config.options["vocabulary"][2] == "mary"
    engine = Engine(model)
    memory = engine.new_memory()
    engine.apply(memory, engine.write("Mary went home."))
    for query in ("Where is Mary?", "Where is Zorblax the Unknown?"):  # unknown words answer too
        answer = engine.apply(memory, engine.query(x=query))
        assert answer.extra["answer"] in ("home", "garden", "apple,milk")
        assert answer.extra["answers"] == answer.extra["answer"].split(",")
        assert answer.slots.tolist() == [0] and answer.weights.tolist() == [1.0]
    with pytest.raises(InvalidInput, match="reads text"):
        engine.write([0.1] * 6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"answers": ["a"]}, "output_dim"),
        ({"hops": 0}, "hops"),
        ({"hops": 33}, "'hops' must be at most 32, got 33"),
        ({"vocabulary": "abc"}, "list"),
        ({"relative_tme": True}, r"options \['relative_tme'\] are not read by any component"),
    ],
)
def test_bad_text_options_stop_loading_with_the_reason(tmp_path, options, message):
    config = text_config(**options)
    with pytest.raises(ModelFileError, match=message):
        random_model(config)


def test_append_only_keeps_write_order_and_overwrites_the_oldest():
    engine = Engine(random_model(text_config(), seed=2))
    memory = engine.new_memory()
    assert memory.filled_count() == 0
    sentences = [f"{w} went home" for w in ("mary", "is", "where", "home", "went", "mary", "is")]
    for s in sentences:
        engine.apply(memory, engine.write(s))
    # 7 writes into 5 slots: writes 5 and 6 replaced writes 0 and 1 (slots 0 and 1)
    assert memory.writes == 7 and memory.filled_count() == 5
    expected = engine._encode(engine._jax, np.stack([engine.write(s).row for s in sentences]))
    np.testing.assert_array_equal(memory.matrix(), expected[[5, 6, 2, 3, 4]])
    ages = engine.generalizer.ages(memory, np.array([0, 1, 2, 3, 4, -1]))
    assert ages.tolist() == [1, 0, 4, 3, 2, 0]


def test_a_text_memory_resumes_from_a_snapshot_with_its_write_order(tmp_path):
    from memnet.snapshot import SnapshotStore

    engine = Engine(random_model(text_config(), seed=3))
    first = [f"{w} went home" for w in ("mary", "is", "where", "home", "went", "mary")]
    then = ["is went home", "where is mary"]
    straight, memory = engine.new_memory(), engine.new_memory()
    for s in first:
        engine.apply(straight, engine.write(s))
        engine.apply(memory, engine.write(s))
    SnapshotStore(tmp_path, engine).save({"m": memory}, position="1-0")
    other = Engine(random_model(text_config(), seed=3))  # (another process, the same model)
    resumed = SnapshotStore(tmp_path, other).load().memories["m"]
    assert resumed.writes == 6 and resumed.filled_count() == 5
    for s in then:
        a = engine.apply(straight, engine.write(s))
        b = other.apply(resumed, other.write(s))  # (a memory is applied by its own engine)
        assert a is None and b is None
    expected = engine.apply(straight, engine.query(x="where is mary"))
    got = other.apply(resumed, other.query(x="where is mary"))
    np.testing.assert_array_equal(expected.y, got.y)
    assert expected.slots.tolist() == got.slots.tolist()


def test_position_bow_refuses_texts_longer_than_a_batch_can_hold():
    with pytest.raises(ModelFileError, match=r"input_dim \(the longest text in words\) must be at"):
        random_model(dataclasses.replace(text_config(), input_dim=10**12))
