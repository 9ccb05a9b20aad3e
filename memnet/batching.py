"""Jitted functions whose per-row results do not depend on the batch they ran in.

XLA on the CPU picks different matmul kernels for different batch sizes, so I(x) computed in a
batch of 7 can differ in the last bit from I(x) computed alone. That would let batching change
which slot is nearest, and make a replay after a crash answer differently. ``rowwise`` runs the
function over fixed-shape chunks of ``CHUNK`` rows with ``lax.map``: every row always goes
through the same compiled computation, so results are bitwise identical however events are
grouped (tests/test_engine.py checks it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

CHUNK = 64


def rowwise(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn(params, *rows) with rows [B, ...] -> jitted, batch-invariant, numpy-returning call."""

    @jax.jit
    def mapped(params: Any, *chunks: jax.Array) -> Any:
        return jax.lax.map(lambda xs: fn(params, *xs), chunks)  # chunks: [N, CHUNK, ...]

    def call(params: Any, *arrays: np.ndarray) -> Any:
        n = len(arrays[0])
        chunks = max(1, -(-n // CHUNK))
        chunks = 1 << (chunks - 1).bit_length()  # powers of two: few distinct compilations
        total = chunks * CHUNK
        padded = []
        for a in arrays:
            full = np.zeros((total, *a.shape[1:]), a.dtype)
            full[:n] = a
            padded.append(full.reshape(chunks, CHUNK, *a.shape[1:]))
        out = mapped(params, *padded)
        return jax.tree.map(lambda o: np.asarray(o).reshape(total, *o.shape[2:])[:n], out)

    return call


def keep_compilations(directory: str | Path) -> Path | None:
    """Keep this process's compiled functions under directory/xla/<this CPU> (JAX's
    persistent compilation cache), so that later processes of this machine -- a worker
    restarting or taking over, ``memnet rebuild`` -- load them instead of compiling
    (scripts/bench_warmup.py: a warm-up of 2.1 s without, 0.45 s from the cache, also for
    another model of the same shapes: the weights are arguments, not constants).

    JAX keys an entry on the computation, its compile options and JAX's version; the CPU is
    added here (its model and feature flags), since compiled code targets the CPU that
    compiled it and a directory may be shared. The same compiled code computes the same
    bits, so results do not depend on the cache (tests/test_compilations.py). JAX writes an
    entry in place and never replaces one, so an entry cut short (its process killed while
    writing it) would be compiled again, with JAX's warning, by every later process:
    such entries are removed here (drop_torn_entries) and the next compilation writes them
    whole. A directory that cannot be made leaves compilations unkept (logged). Call it
    before the first compilation: it sets JAX's configuration for the whole process (a
    library user decides for theirs)."""
    path = Path(directory) / "xla" / _cpu_signature()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compiled functions are not kept (%s): each process compiles them", e)
        return None
    drop_torn_entries(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # (ours are ~0.2 s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def drop_torn_entries(path: Path) -> int:
    """Remove the entries of JAX's compilation cache in path that do not decompress (cut
    short while written); how many. An entry being written by another process right now
    may be removed too: it is then compiled again, and written again, by a later process.
    Entries are KiBs compressed (tens for a large function): checking costs milliseconds."""
    try:  # (JAX's own codec for its entries: zstd when installed, else zlib)
        from jax._src.compilation_cache import decompress_executable
    except ImportError:  # another JAX: entries are left as they are
        return 0
    dropped = 0
    for entry in sorted(path.glob("*-cache")):
        try:
            decompress_executable(entry.read_bytes())
        except OSError:
            continue  # (removed meanwhile, or unreadable: JAX will say so)
        except Exception:  # zlib.error or zstd's ZstdError: cut short
            with contextlib.suppress(OSError):
                entry.unlink()
                dropped += 1
    if dropped:
        log.warning("removed %d compiled function(s) cut short in %s", dropped, path)
    return dropped


def _cpu_signature() -> str:
    """A short hash of this CPU's model and feature flags (Linux), else of what platform
    knows of it."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                elif not line.strip() and len(parts) > 2:
                    break  # (the first processor's block is enough)
    except OSError:
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
