"""A PNG of training: loss (training and validation) and validation accuracy per epoch."""

from __future__ import annotations

from pathlib import Path

from memnet.training.fit import History


def plot_history(runs: dict[int, History], best: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for seed, h in sorted(runs.items()):
        alpha, width = (1.0, 1.6) if seed == best else (0.35, 1.0)
        left.plot(h.train_loss, color="C0", alpha=alpha, lw=width)
        left.plot(h.val_loss, color="C1", alpha=alpha, lw=width)
        right.plot(h.val_accuracy, color="C2", alpha=alpha, lw=width, label=f"seed {seed}")
    left.plot([], color="C0", label="training loss")
    left.plot([], color="C1", label="validation loss")
    left.set(xlabel="epoch", ylabel="loss", yscale="log", title=f"{title}: loss")
    right.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.01), title=f"{title}: validation")
    left.legend()
    right.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
