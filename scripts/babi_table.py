#!/usr/bin/env python
"""The README's bAbI table: the shipped models' validation accuracy (scored in-process by
the serving engine, as ``memnet eval-babi --in-process`` does; ``--both`` shows the
streaming path agrees) beside the published anchors (test error on bAbI 1k, from
data/babi/ANCHORS.md: strongly supervised MemNN, MemN2N PE LS RN per task and joint).

    python scripts/babi_table.py > var/babi_table.md
    python scripts/babi_table.py --models var/models-linear    # models trained elsewhere
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet.babi import NAMES  # noqa: E402
from worker.babi_eval import DATA, MODELS, accuracy, in_process, stories_of, task_events  # noqa: E402

# task: (MemNN strongly supervised, MemN2N per task, MemN2N joint), test error %
ANCHORS = {
    1: (0.0, 0.0, 0.0), 2: (0.0, 8.3, 11.4), 3: (0.0, 40.3, 21.9), 4: (0.0, 2.8, 13.4),
    5: (2.0, 13.1, 14.4), 6: (0.0, 7.6, 2.8), 7: (15.0, 17.3, 18.3), 8: (9.0, 10.0, 9.3),
    9: (0.0, 13.2, 1.9), 10: (2.0, 15.1, 6.5), 11: (0.0, 0.9, 0.3), 12: (0.0, 0.2, 0.1),
    13: (0.0, 0.4, 0.2), 14: (1.0, 1.7, 6.9), 15: (0.0, 0.0, 0.0), 16: (0.0, 1.3, 2.7),
    17: (35.0, 51.0, 40.4), 18: (5.0, 11.1, 9.4), 19: (64.0, 82.8, 88.0), 20: (0.0, 0.0, 0.0),
}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=MODELS, help="default: %(default)s")
    models = parser.parse_args().models
    training = json.loads((models / "training.json").read_text())
    print("| task | ours: validation accuracy (error) | seeds: min–max | MemNN strong sup. | "
          "MemN2N per task | MemN2N joint |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    errors, fails = [], 0
    for task in range(1, 21):
        batch, expected = task_events(task, stories_of(DATA, task, "validation"))
        acc = accuracy(in_process(models / f"qa{task}.safetensors", batch), expected)
        seeds = training[f"qa{task}"]["seed_accuracies"]
        error = round(100 * (1 - acc), 6)  # 95 of 100 right is 5.0%, not a failure
        errors.append(error)
        fails += error > 5
        a = ANCHORS[task]
        mark = " **fails**" if error > 5 else ""
        print(
            f"| {task} {NAMES[task]} | {acc:.1%} ({error:.1f}%){mark} | "
            f"{min(seeds):.0%}–{max(seeds):.0%} | {a[0]} | {a[1]} | {a[2]} |"
        )
    print(
        f"| **mean error / failed (> 5%)** | **{sum(errors) / 20:.1f}% / {fails}** | | "
        "**6.7 / 4** | **13.9 / 11** | **12.4 / 11** |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
