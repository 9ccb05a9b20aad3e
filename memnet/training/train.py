"""``memnet train``: a text memory network for one bAbI task, trained with several seeds;
the seed with the best validation accuracy is written as a model file, with a PNG plot of
its loss and accuracy and a JSON summary (every seed's result: the spread). Each seed is
then scored once on the held-out stories (memnet.babi.split), which no choice looked at."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from memnet.babi import NAMES, read_stories, split, task_file
from memnet.components import REGISTRY
from memnet.config import ModelConfig
from memnet.model import Components, Model, save_model
from memnet.text import Vocabulary
from memnet.training.examples import build, longest_text
from memnet.training.fit import History, accuracy, fit, init_params
from memnet.training.settings import Settings

MAX_SLOTS = 50  # the most recent statements a memory keeps (MemN2N used 50 too)


def task_config(
    stories: list,
    train: list,
    dim: int,
    hops: int,
    output: str,
    response: str,
    relative_time: bool = False,
    latest: bool = False,
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
        options=_read_by(
            ("position-bow", output, response),
            {"vocabulary": vocabulary.words, "answers": answers, "hops": hops}
            | ({"relative_time": True} if relative_time else {})
            | ({"latest": True} if latest else {}),
        ),
    )


def _read_by(names: tuple[str, str, str], options: dict[str, Any]) -> dict[str, Any]:
    """The options the I, O and R named read (a model file refuses others' unknown ones and
    keeps only what its components use)."""
    kinds = zip(("encoder", "output", "response"), names, strict=True)
    read = {o for kind, name in kinds for o in REGISTRY[kind][name].options}
    return {k: v for k, v in options.items() if k in read}


def train_task(
    data: Path | dict[int, Path],
    task: int | list[int],
    out: Path,
    *,
    seeds: int = 3,
    dim: int = 64,
    hops: int = 3,
    output: str = "multi-hop",
    response: str = "answer-mlp",
    relative_time: bool = False,
    latest: bool = False,
    settings: Settings | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """One model for a task, or for several at once (a joint model: their training, validation
    and held-out stories pooled, each task split on its own; data then maps each task to its
    bAbI directory). The summary has each task's held-out accuracy."""
    settings = settings or Settings()
    started = time.monotonic()
    tasks = [task] if isinstance(task, int) else list(task)
    sources = {t: task_file(data if isinstance(data, Path) else data[t], t) for t in tasks}
    splits = {t: split(read_stories(source)) for t, source in sources.items()}
    train = [s for t in tasks for s in splits[t].train]
    val = [s for t in tasks for s in splits[t].validation]
    stories = [s for t in tasks for part in splits[t] for s in part]
    config = task_config(stories, train, dim, hops, output, response, relative_time, latest)
    components = Components.build(config)
    parts = (components.encoder, components.output, components.response)
    specs = components.param_specs()
    shape = (config.slots, config.input_dim, hops)
    vocabulary, answers = components.encoder.vocabulary, config.options["answers"]
    train_ex = build(train, vocabulary, answers, *shape)
    val_ex = build(val, vocabulary, answers, *shape)
    held_ex = {t: build(splits[t].holdout, vocabulary, answers, *shape) for t in tasks}
    label = f"qa{tasks[0]}" if len(tasks) == 1 else "joint"
    runs: list[tuple[float, int, dict, History]] = []
    for seed in range(seeds):
        bar = tqdm(
            total=settings.epochs,
            desc=f"{label} seed {seed}",
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
    best, seed, params, history = max(runs, key=lambda r: (r[0], -r[1]))
    # after the choice: every seed on every task's held-out stories
    by_task = [{t: accuracy(parts, r[2], held_ex[t], settings) for t in tasks} for r in runs]
    held_out = [float(np.mean(list(b.values()))) for b in by_task]  # (one task: its own)
    model = Model.create(config, params)
    save_model(model, out)
    from memnet.training.plot import plot_history

    title = f"bAbI {label}" if len(tasks) == 1 else f"bAbI, one model for {len(tasks)} tasks"
    plot_history({s: h for _, s, _, h in runs}, seed, title, out.with_suffix(".png"))
    where = {t: f"{src.parent.name}/{src.name}" for t, src in sources.items()}  # en-10k/qa2_...
    summary: dict[str, Any] = {
        "task": tasks[0] if len(tasks) == 1 else tasks,
        "name": NAMES[tasks[0]] if len(tasks) == 1 else "joint",
        "data": where[tasks[0]] if len(tasks) == 1 else {f"qa{t}": w for t, w in where.items()},
        "train_questions": train_ex.count(),
        "val_questions": val_ex.count(),
        "holdout_questions": sum(e.count() for e in held_ex.values()),
        "val_accuracy": best,
        "holdout_accuracy": held_out[seed],
        "seed": seed,
        "seed_accuracies": [r[0] for r in runs],
        "seed_holdout_accuracies": held_out,
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
            "relative_time": relative_time,
            "latest": latest,
        },
        "fingerprint": model.fingerprint,
    }
    if len(tasks) > 1:  # the mean over tasks above; each task's here, every seed's
        summary["holdout_by_task"] = {f"qa{t}": [b[t] for b in by_task] for t in tasks}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def spread(values: list[float]) -> str:
    v = np.asarray(values) * 100
    return f"{v.min():.1f}–{v.max():.1f}% (median {np.median(v):.1f}%)"
