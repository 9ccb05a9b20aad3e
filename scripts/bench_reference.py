"""The reference design's per-event code, fixed only so that it runs (the baseline).

It performs the reference article's operations one event at a time, the same way: un-jitted
jax.numpy calls for I, the gate and R; ``knn_query`` k=1 and ``get_items`` for the nearest
slot; ``mark_deleted`` + ``add_items`` to write the slot back; ``knn_query`` k=5 and
``get_items`` for a query, then softmax and the response MLP. The article never imports
numpy and calls a function that does not exist; those are the only fixes. Its index uses
the article's settings (M 16, ef_construction 200, ef left at hnswlib's default).
"""

from __future__ import annotations

import time
from pathlib import Path

import hnswlib
import jax.numpy as jnp
import numpy as np
from jax import nn


def reference_index(memory_init: np.ndarray, cache: Path) -> hnswlib.Index:
    """The article's index over memory_init (built once, cached: it is only a baseline)."""
    slots, dim = memory_init.shape
    path = cache / f"reference-{slots}x{dim}.hnsw"
    index = hnswlib.Index(space="l2", dim=dim)
    if path.exists():
        index.load_index(str(path), max_elements=slots)
        return index
    index.init_index(max_elements=slots, ef_construction=200, M=16)
    index.add_items(memory_init, np.arange(slots))
    cache.mkdir(parents=True, exist_ok=True)
    index.save_index(str(path))
    return index


def write(m_hnsw: hnswlib.Index, x: np.ndarray, params: dict) -> None:
    i_x = nn.relu(jnp.dot(x, params["input_mlp_w1"]) + params["input_mlp_b1"])
    i_x = jnp.dot(i_x, params["input_mlp_w2"]) + params["input_mlp_b2"]
    labels, _ = m_hnsw.knn_query(np.array([i_x]), k=1)
    memory_vector = m_hnsw.get_items([labels[0][0]])[0]
    gate = nn.sigmoid(
        jnp.dot(jnp.concatenate([i_x, jnp.asarray(memory_vector)]), params["gate_w"])
        + params["gate_b"]
    )
    updated = jnp.asarray(memory_vector) * (1 - gate) + i_x * gate
    m_hnsw.mark_deleted(labels[0][0])
    m_hnsw.add_items(np.array([updated]), [labels[0][0]])


def query(m_hnsw: hnswlib.Index, q: np.ndarray, params: dict) -> np.ndarray:
    labels, _ = m_hnsw.knn_query(np.array([q]), k=5)
    retrieved = m_hnsw.get_items(labels[0])
    a = nn.softmax(jnp.dot(q, jnp.array(retrieved).T))
    o = jnp.dot(a, jnp.array(retrieved))
    y = nn.relu(jnp.dot(o, params["response_mlp_w1"]) + params["response_mlp_b1"])
    return np.asarray(jnp.dot(y, params["response_mlp_w2"]) + params["response_mlp_b2"])


def recall(index: hnswlib.Index, memory_init: np.ndarray, queries: np.ndarray, k: int = 5) -> float:
    """recall@k of the article's own search (hnswlib's default ef) against brute force, on
    memory_init: what its speed buys."""
    labels, _ = index.knn_query(queries, k=k)
    norms = (memory_init.astype(np.float64) ** 2).sum(axis=1)
    hits = 0
    for row, q in zip(labels, queries, strict=True):
        truth = np.argsort(norms - 2 * memory_init @ q.astype(np.float64))[:k]
        hits += len(set(row.tolist()) & set(truth.tolist()))
    return hits / (len(queries) * k)


def run(params: dict, index: hnswlib.Index, events: list[tuple[str, str, np.ndarray]]) -> float:
    """Events per second of the reference code over (memory, "write"|"query", vector)."""
    jparams = {k: jnp.asarray(v) for k, v in params.items() if k != "memory_init"}
    for _, kind, value in events[:4]:  # warm jax's per-op caches, as a long run would be
        write(index, value, jparams) if kind == "write" else query(index, value, jparams)
    started = time.perf_counter()
    for _, kind, value in events:
        if kind == "write":
            write(index, value, jparams)
        else:
            query(index, value, jparams)
    return len(events) / (time.perf_counter() - started)
