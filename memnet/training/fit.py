"""Training one model: the serving components' own functions on a dense, exact memory.

The forward pass is exactly what a worker computes for a query (I over every statement in
memory and over the question, O over all filled slots with their ages, R), so a trained model
serves with the same semantics. One jitted step: AdamW (optax; decay 0 by default) on the
answer's cross-entropy, plus, optionally, each hop's attention against its supporting fact
(the strong supervision of Weston et al.'s MemNN), with gradient clipping at norm 40 as in
MemN2N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memnet.components import Encoder, Output, Response
from memnet.training.examples import Examples
from memnet.training.settings import Settings

SUPPORT_WEIGHT = 1.0


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = 0


def init_params(specs: dict[str, Any], seed: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: np.zeros(s.shape, np.float32)
        if s.init == "zeros"
        else (scale * rng.standard_normal(s.shape)).astype(np.float32)
        for name, s in specs.items()
    }


def forward(
    encoder: Encoder, output: Output, response: Response
) -> Callable[[dict, Examples], tuple[jax.Array, jax.Array]]:
    """(params, batch) -> (logits [B, Y], attention of every hop [hops, B, S])."""

    def run(p: dict, b: Any) -> tuple[jax.Array, jax.Array]:
        n, s, length = b.memory.shape
        cand = encoder.encode(p, b.memory.reshape(n * s, length)).reshape(n, s, -1)
        v = encoder.encode(p, b.question)
        if hasattr(output, "hop_attention"):
            feature, attention = output.hop_attention(p, v, cand, b.filled, b.age)
        else:
            feature, weights = output.attend(p, v, cand, b.filled, b.age)
            attention = weights[None]
        return response.respond(p, feature), attention

    return run


def loss_fn(run: Callable, supervise: bool) -> Callable:
    def loss(p: dict, b: Any) -> tuple[jax.Array, jax.Array]:
        logits, attention = run(p, b)
        known = b.answer >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(b.answer, 0))
        total = jnp.sum(jnp.where(known, ce, 0.0)) / jnp.maximum(known.sum(), 1)
        if supervise:
            hops = attention.shape[0]
            target = b.support.T[:hops]  # [hops, B]
            picked = jnp.take_along_axis(attention, jnp.maximum(target, 0)[..., None], -1)[..., 0]
            nll = -jnp.log(picked + 1e-9)
            use = target >= 0
            total += SUPPORT_WEIGHT * jnp.sum(jnp.where(use, nll, 0.0)) / jnp.maximum(use.sum(), 1)
        correct = (jnp.argmax(logits, -1) == b.answer) & known
        return total, correct

    return loss


def fit(
    components: tuple[Encoder, Output, Response],
    params: dict[str, np.ndarray],
    train: Examples,
    val: Examples,
    settings: Settings,
    seed: int,
    progress: Callable[[int, History], None] | None = None,
) -> tuple[dict[str, np.ndarray], History]:
    """Train from params; returns the parameters of the best validation epoch."""
    run = forward(*components)
    loss = loss_fn(run, settings.supervise_support)
    steps_per_epoch = max(1, train.count() // settings.batch)
    schedule = optax.exponential_decay(
        settings.learning_rate, settings.decay_every * steps_per_epoch, 0.5, staircase=True
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(40.0), optax.adamw(schedule, weight_decay=settings.weight_decay)
    )

    @jax.jit
    def step(p: dict, state: Any, b: Examples) -> tuple[dict, Any, jax.Array]:
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(p, b)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    evaluate = jax.jit(loss)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = optimizer.init(p)
    rng = np.random.default_rng(seed)
    history, best, best_key = History(), p, (-1.0, float("inf"))
    for epoch in range(settings.epochs):
        order = rng.permutation(train.count())
        losses = []
        for i in range(steps_per_epoch):
            batch = train.take(order[i * settings.batch : (i + 1) * settings.batch])
            if settings.time_noise:
                batch = batch._replace(age=noisy_ages(batch, settings.time_noise, rng))
            p, state, value = step(p, state, batch)
            losses.append(value)
        val_loss, accuracy = _score(evaluate, p, val, settings.batch)
        history.train_loss.append(float(np.mean(losses)))
        history.val_loss.append(val_loss)
        history.val_accuracy.append(accuracy)
        # Better: higher accuracy, or the same with a validation loss at least 1% lower.
        if accuracy > best_key[0] or (accuracy == best_key[0] and val_loss < best_key[1] * 0.99):
            best, best_key, history.best_epoch = p, (accuracy, val_loss), epoch
        if progress:
            progress(epoch, history)
        if epoch - history.best_epoch >= settings.patience:
            break
    return {k: np.asarray(v, np.float32) for k, v in best.items()}, history


def accuracy(
    components: tuple[Encoder, Output, Response],
    params: dict[str, np.ndarray],
    data: Examples,
    settings: Settings,
) -> float:
    """The share of data's questions answered right by params (the training forward pass,
    which computes what serving computes: tests/test_train.py)."""
    evaluate = jax.jit(loss_fn(forward(*components), settings.supervise_support))
    return _score(evaluate, {k: jnp.asarray(v) for k, v in params.items()}, data, settings.batch)[1]


def noisy_ages(batch: Examples, share: float, rng: np.random.Generator) -> np.ndarray:
    """Ages as if dummy statements (about ``share`` of the real ones) had been written at
    random points in between: each memory's age grows by the dummies written after it."""
    slots = batch.age.shape[1]
    # one possible dummy after each write; an empty slot (age 0, as the newest write's) was
    # never written, so nothing follows it
    dummies = (rng.random(batch.age.shape) < share) & batch.filled
    # age a (0 = newest) gains the dummies that followed the writes of ages a-1 .. 0
    order = np.argsort(batch.age, axis=1, kind="stable")
    after = np.cumsum(np.take_along_axis(dummies, order, 1), axis=1) - np.take_along_axis(
        dummies, order, 1
    )
    extra = np.empty_like(after)
    np.put_along_axis(extra, order, after, 1)
    return np.where(batch.filled, np.minimum(batch.age + extra, slots - 1), 0).astype(np.int32)


def _score(evaluate: Callable, p: dict, data: Examples, batch: int) -> tuple[float, float]:
    """(mean loss, accuracy) over data, in fixed-size batches: one compiled shape. The last
    one is padded with copies of the first examples, their answers and supporting facts
    marked unknown (-1), which the loss leaves out."""
    losses, correct = [], 0
    for i in range(0, data.count(), batch):
        index = np.arange(i, i + batch) % data.count()
        real = min(batch, data.count() - i)
        part = data.take(index)
        if real < batch:
            part.answer[real:] = -1
            part.support[real:] = -1
        value, right = evaluate(p, part)
        losses.append(float(value) * real)
        correct += int(np.asarray(right)[:real].sum())
    return sum(losses) / data.count(), correct / data.count()
