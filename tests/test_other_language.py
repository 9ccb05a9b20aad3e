"""A producer in another language (Node.js, no packages) works from docs/protocol.md."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis

from memnet import Engine, load_model
from tests.streams import wait_for
from tests.test_worker import CONFIG
from worker.local import WorkerProcess

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "node_client.mjs"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_producer_gets_the_same_answer_as_the_library(redis_url, tmp_path, model_file):
    worker = WorkerProcess(
        {
            "REDIS_URL": redis_url,
            "MEMNET_MODEL": str(model_file),
            "MEMNET_SNAPSHOT_DIR": str(tmp_path / "snap"),
            "MEMNET_PREFIX": "js",
            "MEMNET_PARTITIONS": "4",
        },
        tmp_path / "worker.log",
    )
    r = redis.Redis.from_url(redis_url)
    try:
        wait_for(lambda: r.exists("js:{0}:lease"), 90, "the worker to take its partitions")
        done = subprocess.run(
            ["node", str(SCRIPT), redis_url, "js", "from-node-memory", str(CONFIG.input_dim)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        assert worker.stop() == 0
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout)["response"]

    def vector(seed):
        return np.array([math.sin(seed * 7 + k) for k in range(CONFIG.input_dim)], np.float32)

    engine = Engine(load_model(model_file))
    memory = engine.new_memory()
    for seed in (1, 2, 3):
        engine.apply(memory, engine.write(vector(seed)))
    answer = engine.apply(memory, engine.query(x=vector(4)))
    assert response["id"] == "from-node" and response["memory"] == "from-node-memory"
    np.testing.assert_array_equal(np.array(response["y"], np.float32), answer.y)
    assert response["slots"] == answer.slots.tolist()
