from __future__ import annotations

import numpy as np
import pytest

from memnet import ModelConfig, random_model

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
