"""memnet.batching.keep_compilations: a later process loads the compiled functions instead of
compiling them, and computes the same bits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from memnet import random_model, save_model
from tests.conftest import WORKER_MODEL

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import sys
import jax.monitoring
import numpy as np
from memnet import Engine, load_model
from memnet.batching import keep_compilations
events = []
jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
keep_compilations(sys.argv[1])
engine = Engine(load_model(sys.argv[2]))
engine.warm_up(64)
rng = np.random.default_rng(3)
items = []
for i in range(200):
    memory = engine.new_memory() if i % 50 == 0 else items[-1][0]
    x = rng.standard_normal(engine.config.input_dim).astype(np.float32)
    q = rng.standard_normal(engine.config.memory_dim).astype(np.float32)
    items.append((memory, engine.write(x) if i % 2 else engine.query(q=q)))
ys = [r.y for r in engine.process(items) if r is not None]
np.save(sys.argv[3], np.stack(ys))
hits = events.count("/jax/compilation_cache/cache_hits")
misses = events.count("/jax/compilation_cache/cache_misses")
print(hits, misses)
"""


def run(cache: Path, model: Path, out: Path) -> tuple[np.ndarray, list[int]]:
    """The answers of a fresh process, and its cache (hits, misses)."""
    args = [sys.executable, "-c", RUN, str(cache), str(model), str(out)]
    done = subprocess.run(args, cwd=ROOT, check=True, timeout=300, capture_output=True, text=True)
    return np.load(out), [int(n) for n in done.stdout.split()[-2:]]


def entries(cache: Path) -> set[str]:
    return {p.name for p in (cache / "xla").rglob("*") if p.is_file()}


def test_a_later_process_loads_the_compiled_functions_and_computes_the_same_bits(tmp_path):
    model = tmp_path / "m.safetensors"
    save_model(random_model(WORKER_MODEL, seed=4), model)
    cache = tmp_path / "cache"
    cold, (hits, misses) = run(cache, model, tmp_path / "cold.npy")
    kept = entries(cache)
    assert hits == 0 and misses >= 2 and len(kept) >= misses  # (I and O+R, each shape)
    assert len(list((cache / "xla").iterdir())) == 1  # one directory: this CPU's
    other_model = tmp_path / "other.safetensors"  # (the same shapes, other weights)
    save_model(random_model(WORKER_MODEL, seed=5), other_model)
    for path in (model, other_model):
        warm, (hits, misses) = run(cache, path, tmp_path / "warm.npy")
        assert hits >= 2 and misses == 0 and entries(cache) == kept
        fresh, _ = run(tmp_path / f"fresh-{path.stem}", path, tmp_path / "fresh.npy")
        assert warm.tobytes() == fresh.tobytes()  # the same bits as compiled afresh
        if path == model:
            assert warm.tobytes() == cold.tobytes()


def test_a_cache_directory_that_cannot_be_made_leaves_compilations_unkept(tmp_path, caplog):
    from memnet.batching import keep_compilations

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert keep_compilations(blocker / "cache") is None  # (a file where a directory goes)
    assert "compiled functions are not kept" in caplog.text


def test_an_entry_cut_short_is_compiled_again_once_and_then_loaded(tmp_path):
    """A process killed while JAX wrote an entry leaves it cut short; JAX never replaces an
    entry, so without keep_compilations' check every later process would compile it again."""
    model = tmp_path / "m.safetensors"
    save_model(random_model(WORKER_MODEL, seed=4), model)
    cache = tmp_path / "cache"
    cold, _ = run(cache, model, tmp_path / "cold.npy")
    kept = sorted((cache / "xla").rglob("*-cache"), key=lambda p: p.stat().st_size)
    torn = kept[-1]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # (as a kill leaves it)
    _, (hits, misses) = run(cache, model, tmp_path / "again.npy")
    assert misses == 1 and hits == len(kept) - 1  # that one compiled again, and written whole
    warm, (hits, misses) = run(cache, model, tmp_path / "warm.npy")
    assert misses == 0 and hits == len(kept)
    assert warm.tobytes() == cold.tobytes()
