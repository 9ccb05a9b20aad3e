"""Training settings (no JAX here: the CLI reads the defaults without importing it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    epochs: int = 200
    patience: int = 40  # epochs without a better validation result before stopping
    batch: int = 32
    learning_rate: float = 0.01
    decay_every: int = 25  # epochs; the learning rate halves each time (as in MemN2N)
    init_scale: float = 0.1
    supervise_support: bool = True
    # MemN2N's "random noise": each training batch spreads its memories over ages as if
    # about this share of dummy statements had been written between them (regularises the
    # learned time encoding, which otherwise memorises the training stories' lengths).
    time_noise: float = 0.1
    weight_decay: float = 0.0
