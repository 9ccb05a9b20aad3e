#!/usr/bin/env python
"""Train the shipped bAbI models: one per task, the same learner and settings for all.

    python scripts/train_babi.py                 # all 20 tasks -> models/babi/
    python scripts/train_babi.py --tasks 1,2 --out var/models

Each task writes qaN.safetensors, qaN.png (loss and accuracy) and qaN.json (every seed's
validation accuracy, epochs, seconds); training.json collects the summaries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet.training.train import spread, train_task  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(map(str, range(1, 21))))
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "babi" / "en")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "babi")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--response", default="answer-mlp", help="the R component")
    args = parser.parse_args()
    summaries = {}
    index = args.out / "training.json"
    if index.exists():
        summaries = json.loads(index.read_text())
    for task in (int(t) for t in args.tasks.split(",")):
        s = train_task(
            args.data, task, args.out / f"qa{task}.safetensors", seeds=args.seeds,
            response=args.response, show_progress=False,
        )  # fmt: skip
        summaries[f"qa{task}"] = s
        index.write_text(json.dumps(summaries, indent=1) + "\n")
        print(
            f"qa{task:<3} {s['val_accuracy']:7.1%}  seeds {spread(s['seed_accuracies'])}  "
            f"{s['seconds']:6.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
