#!/usr/bin/env python
"""How long a fresh process takes to warm an engine up (compile I and O+R for every batch
shape, Engine.warm_up), without kept compilations and with them
(memnet.batching.keep_compilations): the first process with an empty cache directory, then
one for the same model and one for another model of the same shapes, each a new process.

    .venv/bin/python scripts/bench_warmup.py                # bench_rebuild's 64-slot model
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet import ModelConfig, random_model, save_model  # noqa: E402

MODEL = ModelConfig(input_dim=8, memory_dim=8, output_dim=3, hidden=16, slots=64, top_k=5)
ONE = """
import sys, time
from memnet import Engine, load_model
from memnet.batching import keep_compilations
if sys.argv[1] != "-":
    keep_compilations(sys.argv[1])
engine = Engine(load_model(sys.argv[2]))
began = time.perf_counter()
engine.warm_up(1000)
print(time.perf_counter() - began)
"""


def warm_up(cache: str, model: Path) -> float:
    out = subprocess.run([sys.executable, "-c", ONE, cache, str(model)], cwd=ROOT, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return round(float(out.stdout.split()[-1]), 2)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="memnet-warmup-") as tmp:
        a, b, cache = Path(tmp) / "a.safetensors", Path(tmp) / "b.safetensors", tmp + "/cache"
        save_model(random_model(MODEL, seed=1), a)
        save_model(random_model(MODEL, seed=2), b)
        figures = {
            "no_cache_s": warm_up("-", a),
            "empty_cache_s": warm_up(cache, a),
            "cached_same_model_s": warm_up(cache, a),
            "cached_other_model_s": warm_up(cache, b),
        }
        figures["cache_kb"] = round(sum(p.stat().st_size for p in Path(cache).rglob("*")) / 1024)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
