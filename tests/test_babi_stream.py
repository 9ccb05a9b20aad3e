"""Text end to end: bAbI stories streamed through real workers answer exactly as in-process,
unknown words are answered, and bad text becomes a dead letter and an error response."""

from __future__ import annotations

import numpy as np
import pytest

from memnet import Engine, load_model
from memnet.babi import BabiError
from tests.babi import DATA
from tests.streams import outputs, send, worker_settings
from worker.babi_eval import (
    accuracy,
    data_for,
    in_process,
    stories_of,
    streamed,
    task_events,
)
from worker.protocol import partition_of
from worker.worker import Worker


def test_streamed_answers_equal_in_process_answers(redis_url, tmp_path, babi_model):
    batch, expected = task_events(1, stories_of(DATA, 1, "holdout"))
    extra = [  # a story of its own, with words the model never saw
        {"op": "write", "memory": "odd", "text": "Zorblax teleported to the kitchen."},
        {"op": "write", "memory": "odd", "text": "Mary went to the garden."},
        {"op": "query", "memory": "odd", "id": "odd-0", "text": "Where is Zorblax?"},
        {"op": "query", "memory": "odd", "id": "odd-1", "text": "Where is Mary?"},
    ]
    streamed_answers = streamed(redis_url, tmp_path, babi_model, batch + extra, workers=2)
    local = in_process(babi_model, batch + extra)
    assert streamed_answers == local  # answer for answer, every query
    assert accuracy(streamed_answers, expected) >= 0.95
    assert local["odd-1"] == "garden" and local["odd-0"] is not None


def test_bad_text_is_dead_lettered_with_an_error_response(
    redis_url, tmp_path, babi_model, redis_server
):
    partitions, prefix = 2, "bt"
    m = next(f"m{i}" for i in range(99) if partition_of(f"m{i}", partitions) == 0)
    too_long = " ".join(["mary"] * 50)
    batch = [
        {"op": "write", "memory": m, "text": "Mary went to the garden."},
        {"op": "query", "memory": m, "id": "long", "text": too_long},
        {"op": "query", "memory": m, "id": "empty", "text": "?!"},
        {"op": "query", "memory": m, "id": "vector", "x": [0.5] * 6},
        {"op": "query", "memory": m, "id": "both", "text": "Where is Mary?", "x": [1.0]},
        {"op": "write", "memory": m, "text": 42},
        {"op": "query", "memory": m, "id": "ok", "text": "Where is Mary?"},
    ]
    send(redis_server.client(), prefix, partitions, batch)
    settings = worker_settings(redis_url, tmp_path, babi_model, prefix, partitions)
    Worker(settings, Engine(load_model(babi_model))).run(burst=True)
    responses = {r["id"]: r for _, r in outputs(redis_server.client(), prefix, partitions)}
    assert "at most" in responses["long"]["error"]
    assert "no words" in responses["empty"]["error"]
    assert "reads text" in responses["vector"]["error"]
    assert "exactly one" in responses["both"]["error"]
    assert responses["ok"]["answer"] == "garden"  # the bad ones changed nothing
    dead = [d for _, d in outputs(redis_server.client(), prefix, partitions, "dead")]
    assert len(dead) == 5 and all(d["raw"] for d in dead)
    assert any("'text' must be a string" in d["error"] for d in dead)
    assert np.isfinite(responses["ok"]["y"]).all()


def test_eval_scores_each_model_on_the_data_it_was_trained_on(tmp_path, capsys):
    """eval-babi without --data: the directory a model's summary records (a 10k model on
    the 10k file), the 1k files where that directory lacks the task (qa3 in 10k) or the
    summary names no directory."""
    tenk = DATA.parent / "en-10k"
    model = tmp_path / "qa2.safetensors"
    (tmp_path / "qa2.json").write_text('{"data": "en-10k/qa2_two-supporting-facts_train.txt"}')
    assert data_for(None, 2, model) == tenk
    assert len(stories_of(data_for(None, 2, model), 2, "holdout")) == 200  # of 2,000 stories
    (tmp_path / "qa3.json").write_text('{"data": "qa3_three-supporting-facts_train.txt"}')
    assert data_for(None, 3, tmp_path / "qa3.safetensors") == DATA
    assert data_for(tenk, 3) == DATA
    assert "qa3: no file in" in capsys.readouterr().err
    assert data_for(None, 5, tmp_path / "qa5.safetensors") == DATA  # no summary at all
    # a summary naming files this checkout lacks: not the 1k files (10k's hold their stories)
    (tmp_path / "qa4.json").write_text('{"data": "en-10k-x/qa4_two-arg-relations_train.txt"}')
    with pytest.raises(BabiError, match=r"en-10k-x/qa4.*pass --data"):
        data_for(None, 4, tmp_path / "qa4.safetensors")
