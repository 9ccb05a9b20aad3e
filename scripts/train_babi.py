#!/usr/bin/env python
"""Train the shipped bAbI models: one per task, the same learner and settings for all.

    python scripts/train_babi.py                 # bAbI 1k, all 20 tasks -> models/babi/
    python scripts/train_babi.py --tasks 1,2 --out var/models
    python scripts/train_babi.py --tenk          # bAbI 10k (qa3 on 1k) -> models/babi-10k/
    python scripts/train_babi.py --joint         # one model for all 20 -> models/babi-joint/

Each task writes qaN.safetensors, qaN.png (loss and accuracy) and qaN.json (every seed's
validation and held-out accuracy, epochs, seconds); training.json collects the summaries.
The seed is chosen on validation only; held-out accuracy is computed after the choice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet.babi import BabiError, task_file  # noqa: E402
from memnet.cli import non_negative, positive  # noqa: E402
from memnet.training.settings import Settings  # noqa: E402
from memnet.training.train import spread, train_task  # noqa: E402

DATA_10K = ROOT / "data" / "babi" / "en-10k"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(map(str, range(1, 21))))
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "babi" / "en")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "babi")
    parser.add_argument("--seeds", type=positive, default=3)
    parser.add_argument("--response", default="answer-mlp", help="the R component")
    parser.add_argument(
        "--relative-time",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="O's relative time term (multi-hop's relative_time option)",
    )
    parser.add_argument(
        "--latest",
        action="store_true",
        help="hops after the first read the latest matching fact before the hop before's "
        "(multi-hop's latest option)",
    )
    parser.add_argument(
        "--dim", type=positive, default=64, help="embedding size (memory_dim is twice it)"
    )
    parser.add_argument(
        "--weight-decay", type=non_negative, default=Settings.weight_decay, help="AdamW's decay"
    )
    parser.add_argument(
        "--support",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="supervise each hop's attention with the supporting facts (strong supervision)",
    )
    parser.add_argument("--epochs", type=positive, default=None, help=f"default {Settings.epochs}")
    parser.add_argument(
        "--patience", type=positive, default=None, help=f"default {Settings.patience}"
    )
    parser.add_argument(
        "--decay-every",
        type=positive,
        default=Settings.decay_every,
        help="epochs between halvings of the learning rate (default %(default)s)",
    )
    parser.add_argument(
        "--tenk",
        action="store_true",
        help="bAbI 10k from --data-10k, 1k where a task has no 10k file; --out defaults to "
        "models/babi-10k, --epochs to 100, --patience to 20 (an epoch is 10x longer)",
    )
    parser.add_argument("--data-10k", type=Path, default=DATA_10K)
    parser.add_argument(
        "--joint",
        action="store_true",
        help="one model for all the tasks (--out/joint.safetensors; --out defaults to "
        "models/babi-joint, or models/babi-10k with --tenk)",
    )
    args = parser.parse_args()
    if args.joint and args.out == parser.get_default("out"):
        args.out = ROOT / "models" / ("babi-10k" if args.tenk else "babi-joint")
    if args.tenk and args.out == parser.get_default("out"):
        args.out = ROOT / "models" / "babi-10k"
    if args.epochs is None:  # an explicit value is kept, --tenk or not
        args.epochs = 100 if args.tenk else Settings.epochs
    if args.patience is None:
        args.patience = 20 if args.tenk else Settings.patience
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def data_of(args: argparse.Namespace, tasks: list[int]) -> tuple[dict, dict]:
    """Each task's bAbI directory, and the settings of those that fall back to 1k."""
    where, special = {}, {}
    for task in tasks:
        where[task] = args.data
        if args.tenk:
            try:
                task_file(args.data_10k, task)
                where[task] = args.data_10k
            except BabiError:  # as the 1k models are trained
                print(f"qa{task}: no 10k file in {args.data_10k}: training on 1k", flush=True)
                special[task] = Settings(
                    supervise_support=args.support, weight_decay=args.weight_decay
                )
    return where, special


def main() -> int:
    args = parse_args()
    settings = Settings(
        epochs=args.epochs,
        patience=args.patience,
        decay_every=args.decay_every,
        supervise_support=args.support,
        weight_decay=args.weight_decay,
    )
    index = args.out / "training.json"
    tasks = [int(t) for t in args.tasks.split(",")]
    where, special = data_of(args, tasks)
    if args.joint:
        s = train_task(
            where, tasks, args.out / "joint.safetensors", seeds=args.seeds,
            response=args.response, relative_time=args.relative_time, latest=args.latest,
            dim=args.dim, settings=settings, show_progress=False,
        )  # fmt: skip
        record(index, "joint", s)
        for task, seeds in s["holdout_by_task"].items():
            print(f"{task:<5} held out {seeds[s['seed']]:6.1%} (seeds {spread(seeds)})")
        print(
            f"joint validation {s['val_accuracy']:6.1%} (seeds {spread(s['seed_accuracies'])})"
            f"  held out, mean over tasks {s['holdout_accuracy']:6.1%}  {s['seconds']:6.1f} s"
        )
        return 0
    for task in tasks:
        s = train_task(
            where[task], task, args.out / f"qa{task}.safetensors", seeds=args.seeds,
            response=args.response, relative_time=args.relative_time, latest=args.latest,
            dim=args.dim, settings=special.get(task, settings), show_progress=False,
        )  # fmt: skip
        record(index, f"qa{task}", s)
        print(
            f"qa{task:<3} validation {s['val_accuracy']:6.1%} (seeds "
            f"{spread(s['seed_accuracies'])})  held out {s['holdout_accuracy']:6.1%} (seeds "
            f"{spread(s['seed_holdout_accuracies'])})  {s['seconds']:6.1f} s",
            flush=True,
        )
    return 0


def record(index: Path, key: str, summary: dict) -> None:
    """Add a summary to training.json, read just before (two runs may share the file)."""
    summaries = json.loads(index.read_text()) if index.exists() else {}
    summaries[key] = summary
    index.write_text(json.dumps(summaries, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
