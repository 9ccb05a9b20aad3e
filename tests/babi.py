"""A small bAbI model trained once per test session (task 1, one seed, a few seconds)."""

from __future__ import annotations

from pathlib import Path

from memnet.training.settings import Settings
from memnet.training.train import train_task

DATA = Path(__file__).resolve().parents[1] / "data" / "babi" / "en"


def train_small(
    out: Path,
    task: int = 1,
    epochs: int = 40,
    response: str = "answer",
    relative: bool = False,
    latest: bool = False,
) -> Path:
    path = out / f"qa{task}.safetensors"
    train_task(
        DATA, task, path, seeds=1, dim=16, response=response, relative_time=relative,
        latest=latest, settings=Settings(epochs=epochs), show_progress=False,
    )  # fmt: skip
    return path
