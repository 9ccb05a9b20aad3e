"""``memnet train``: a text memory network for one bAbI task, trained with several seeds;
the seed with the best validation accuracy is written as a model file, with a PNG plot of
its loss and accuracy and a JSON summary (every seed's result: the spread)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from memnet.babi import NAMES, read_stories, split, task_file
from memnet.config import ModelConfig
from memnet.model import Components, Model, save_model
from memnet.text import Vocabulary
from memnet.training.examples import build, longest_text
from memnet.training.fit import History, fit, init_params
from memnet.training.settings import Settings

MAX_SLOTS = 50  # the most recent statements a memory keeps (MemN2N used 50 too)


def task_config(
    stories: list, train: list, dim: int, hops: int, output: str, response: str
) -> ModelConfig:
    """Sizes from the data: vocabulary and answers from the training stories only (so the
    unknown-word path is real), the longest text and the longest story (capped) overall."""
    vocabulary = Vocabulary.build(
        t for s in train for t in s.statements + [q.text for q in s.questions]
    )
    answers = sorted({q.answer for s in train for q in s.questions})
    slots = min(MAX_SLOTS, max(q.after for s in stories for q in s.questions))
    return ModelConfig(
        input_dim=longest_text(stories),
        memory_dim=2 * dim,
        output_dim=len(answers),
        hidden=dim,
        slots=max(1, slots),
        top_k=max(1, slots),  # attend over the whole memory, as training does
        encoder="position-bow",
        generalizer="append-only",
        output=output,
        response=response,
        options={"vocabulary": vocabulary.words, "answers": answers, "hops": hops},
    )


def train_task(
    data: Path,
    task: int,
    out: Path,
    *,
    seeds: int = 3,
    dim: int = 64,
    hops: int = 3,
    output: str = "multi-hop",
    response: str = "answer-mlp",
    settings: Settings | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    settings = settings or Settings()
    started = time.monotonic()
    source = task_file(data, task)
    stories = read_stories(source)
    train, val = split(stories)
    config = task_config(stories, train, dim, hops, output, response)
    components = Components.build(config)
    parts = (components.encoder, components.output, components.response)
    specs = components.param_specs()
    shape = (config.slots, config.input_dim, hops)
    train_ex = build(train, components.encoder.vocabulary, config.options["answers"], *shape)
    val_ex = build(val, components.encoder.vocabulary, config.options["answers"], *shape)
    runs: list[tuple[float, int, dict, History]] = []
    for seed in range(seeds):
        bar = tqdm(
            total=settings.epochs,
            desc=f"qa{task} seed {seed}",
            disable=not show_progress,
            leave=False,
        )

        def progress(epoch: int, h: History, bar: Any = bar) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{h.train_loss[-1]:.3f}", val_acc=f"{h.val_accuracy[-1]:.3f}")

        params, history = fit(
            parts,
            init_params(specs, seed, settings.init_scale),
            train_ex,
            val_ex,
            settings,
            seed,
            progress,
        )
        bar.close()
        runs.append((max(history.val_accuracy), seed, params, history))
    accuracy, seed, params, history = max(runs, key=lambda r: (r[0], -r[1]))
    model = Model.create(config, params)
    save_model(model, out)
    from memnet.training.plot import plot_history

    plot_history({s: h for _, s, _, h in runs}, seed, f"bAbI qa{task}", out.with_suffix(".png"))
    summary = {
        "task": task,
        "name": NAMES[task],
        "data": str(source.name),
        "train_questions": train_ex.count(),
        "val_questions": val_ex.count(),
        "val_accuracy": accuracy,
        "seed": seed,
        "seed_accuracies": [r[0] for r in runs],
        "best_epoch": history.best_epoch,
        "epochs_run": [len(r[3].val_accuracy) for r in runs],
        "seconds": round(time.monotonic() - started, 1),
        "settings": {
            **asdict(settings),
            "seeds": seeds,
            "dim": dim,
            "hops": hops,
            "output": output,
            "response": response,
        },
        "fingerprint": model.fingerprint,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def spread(values: list[float]) -> str:
    v = np.asarray(values) * 100
    return f"{v.min():.1f}–{v.max():.1f}% (median {np.median(v):.1f}%)"
