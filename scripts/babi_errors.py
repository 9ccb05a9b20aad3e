#!/usr/bin/env python
"""What a shipped bAbI model gets wrong on its held-out stories (or, with --split validation,
its validation stories; scored in-process, as ``memnet eval-babi --in-process`` does), by
kind: a count off by n, a list ("milk,football") missing an item or with one too many, the
right items in the wrong order, or other; and whether any held-out answer never occurs in
the training stories (a single-class R could not give it). For a multi-hop model, also which
hop went astray: of the wrong answers, how many had each hop's strongest attention off that
hop's supporting fact, and whether it picked an older or a newer fact (the training forward
pass, which computes what serving computes).

    python scripts/babi_errors.py --tasks 7,8
    python scripts/babi_errors.py --tasks 7,8 --models models/babi-10k
    python scripts/babi_errors.py --tasks 3 --split validation
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet import load_model  # noqa: E402
from memnet.training.examples import build  # noqa: E402
from memnet.training.fit import forward  # noqa: E402
from worker.babi_eval import (  # noqa: E402
    MODELS,
    data_for,
    in_process,
    model_for,
    parse_tasks,
    stories_of,
    task_events,
)

COUNTS = ["none", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def kind(want: str, got: str | None) -> str:
    """How an answer differs from the expected one (lists are comma-separated)."""
    if got is None:
        return "error response"
    if want in COUNTS and got in COUNTS:
        return f"count off by {abs(COUNTS.index(want) - COUNTS.index(got))}"
    w, g = want.split(","), got.split(",")
    if set(w) == set(g):
        return "order"
    if set(g) < set(w):
        return "missing item"
    if set(g) > set(w):
        return "extra item"
    return "other"


def hops_astray(model_path: Path, stories: list) -> str:
    """Per hop, the wrong answers whose strongest attention is off that hop's supporting fact
    (older or newer than it); '' for a model without hops or supporting facts."""
    import jax.numpy as jnp
    import numpy as np

    model = load_model(model_path)
    parts, cfg = model.components, model.config
    hops = cfg.options.get("hops")
    if not hasattr(parts.output, "hop_attention") or not hops:
        return ""
    ex = build(stories, parts.encoder.vocabulary, cfg.options["answers"], cfg.slots,
               cfg.input_dim, hops)  # fmt: skip
    run = forward(parts.encoder, parts.output, parts.response)
    logits, attention = run({k: jnp.asarray(v) for k, v in model.params.items()}, ex)
    wrong = np.asarray(logits).argmax(-1) != ex.answer
    attention = np.asarray(attention)
    picked = attention.argmax(-1).T  # [N, hops]
    # a latest hop's weights may sum to ~0: it matched nothing, and its argmax means nothing
    none = (attention.sum(-1) < 0.5).T
    out = []
    for h in range(hops):
        want = ex.support[:, h]
        off = wrong & (want >= 0) & (picked[:, h] != want)
        rows = np.flatnonzero(off & ~none[:, h])
        older = int((ex.age[rows, picked[rows, h]] > ex.age[rows, want[rows]]).sum())
        out.append(
            f"hop {h + 1} {off.sum()} ({older} older, {len(rows) - older} newer, "
            f"{int((off & none[:, h]).sum())} matched nothing)"
        )
    return f"; of the {int(wrong.sum())} wrong, off their supporting fact: " + ", ".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=MODELS, help="default: %(default)s")
    parser.add_argument("--tasks", type=parse_tasks, default=parse_tasks("7,8"))
    parser.add_argument(
        "--split", choices=("holdout", "validation"), default="holdout",
        help="the stories to score (default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args()
    for task in args.tasks:
        model = model_for(args.models, task)
        data = data_for(None, task, model)
        trained = {q.answer for s in stories_of(data, task, "train") for q in s.questions}
        stories = stories_of(data, task, args.split)
        batch, expected = task_events(task, stories)
        answers = in_process(model, batch)
        kinds = Counter(kind(a, answers.get(i)) for i, a in expected.items() if answers.get(i) != a)
        unseen = sum(a not in trained for a in expected.values())
        wrong = ", ".join(f"{n} {k}" for k, n in kinds.most_common()) or "none"
        print(
            f"qa{task}: {sum(kinds.values())} of {len(expected)} {args.split} answers wrong "
            f"({wrong}); {unseen} {args.split} answers never occur in training"
            + hops_astray(model, stories)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
