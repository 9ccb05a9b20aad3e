from __future__ import annotations

import numpy as np
import pytest

from memnet import ModelConfig, random_model, save_model

pytest_plugins = ["tests.fixtures_s3"]


@pytest.fixture(scope="session", autouse=True)
def _machine_cache(tmp_path_factory):
    """Workers and rebuilds the tests start (in this process or as processes) keep their
    compiled functions in a directory of this session, not in the checkout's var/cache."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MEMNET_CACHE_DIR", str(tmp_path_factory.mktemp("machine-cache")))
        yield


# The small model the worker tests serve (exact search, fast to compile).
WORKER_MODEL = ModelConfig(input_dim=8, memory_dim=8, output_dim=3, hidden=16, slots=64, top_k=5)

REFERENCE_SIZES = {
    "input_dim": 5,
    "memory_dim": 10,
    "output_dim": 5,
    "hidden": 16,
    "slots": 10,
    "top_k": 5,
}


def make_model(seed: int = 0, **sizes):
    config = ModelConfig(**{**REFERENCE_SIZES, **sizes})
    return random_model(config, seed=seed)


def close(ours, ref, rtol=2e-4):
    """float32 results against the float64 reference, scaled to the reference's magnitude."""
    ref = np.asarray(ref, np.float64)
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=rtol, atol=rtol * scale)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from worker.servers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """A real, empty Redis for this test."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(random_model(WORKER_MODEL, seed=11), path)
    return path


@pytest.fixture(scope="session")
def babi_model(tmp_path_factory):
    """qa1 trained for a few seconds: good enough to answer its validation stories."""
    from tests.babi import train_small

    return train_small(tmp_path_factory.mktemp("babi"))
