"""A real, small training to run as a ``train`` job: linear regression by mini-batch SGD with momentum.

``jobbridge.training.examples:linear_regression`` fits ``y = X w + b`` on a generated, seeded dataset.
It is deterministic down to the bit: the dataset comes from ``seed``, and everything that changes from
step to step (weights, the momentum buffer, the state of the generator that draws mini-batches) is in
the checkpoint. So a run killed at step k and resumed from its checkpoint ends with exactly the same
weights (the same bytes, hence the same ``weights_sha256``) as a run that was never interrupted.

Config (all optional): ``samples`` (512), ``features`` (8), ``noise`` (0.1), ``seed`` (0),
``batch_size`` (32), ``learning_rate`` (0.05), ``momentum`` (0.9), and ``step_delay`` (0.0 seconds
of sleep per step: makes a demo or a test slow enough to watch, interrupt or kill midway; it changes
nothing in the result).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobbridge.training.context import TrainContext

__all__ = ["LinearRegressionConfig", "linear_regression", "make_dataset"]


@dataclass(frozen=True)
class LinearRegressionConfig:
    """The example's config, with its defaults."""

    samples: int = 512
    features: int = 8
    noise: float = 0.1
    seed: int = 0
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    step_delay: float = 0.0

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> LinearRegressionConfig:
        """Read the job's config; an unknown or bad key is an error naming it."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config keys {unknown} are not known: use {sorted(known)}")
        values = cls(**dict(config))
        if min(values.samples, values.features, values.batch_size) < 1:
            raise ValueError("config 'samples', 'features' and 'batch_size' must be at least 1")
        return values


def make_dataset(config: LinearRegressionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, true_weights)`` from ``config.seed``; X has a trailing column of ones for the bias."""
    rng = np.random.default_rng(config.seed)
    features = rng.normal(size=(config.samples, config.features))
    true_weights = rng.normal(size=config.features + 1)
    x = np.hstack([features, np.ones((config.samples, 1))])
    y = x @ true_weights + config.noise * rng.normal(size=config.samples)
    return x, y, true_weights


def _fresh_state(config: LinearRegressionConfig) -> dict[str, Any]:
    batches = np.random.default_rng([config.seed, 1])  # its own stream: independent of the data's
    return {
        "weights": np.zeros(config.features + 1),
        "velocity": np.zeros(config.features + 1),
        "rng": batches.bit_generator.state,
    }


def _generator(state: Mapping[str, Any]) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = dict(state["rng"])
    return rng


def _mse(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    return float(np.mean((x @ weights - y) ** 2))


def linear_regression(ctx: TrainContext) -> dict[str, Any]:
    """Train for ``ctx.steps`` mini-batch steps, resuming from the checkpoint when there is one."""
    config = LinearRegressionConfig.of(ctx.config)
    x, y, true_weights = make_dataset(config)
    state = ctx.load_checkpoint() or _fresh_state(config)
    weights = np.array(state["weights"], dtype=np.float64)
    velocity = np.array(state["velocity"], dtype=np.float64)
    rng = _generator(state)

    def snapshot() -> dict[str, Any]:
        return {"weights": weights, "velocity": velocity, "rng": rng.bit_generator.state}

    for step in range(ctx.start_step + 1, ctx.steps + 1):
        batch = rng.integers(0, config.samples, size=config.batch_size)
        xb, yb = x[batch], y[batch]
        error = xb @ weights - yb
        gradient = xb.T @ error / config.batch_size
        velocity = config.momentum * velocity - config.learning_rate * gradient
        weights = weights + velocity
        if config.step_delay > 0:
            time.sleep(config.step_delay)
        if ctx.step_done(step, snapshot, loss=float(np.mean(error**2))):
            return {"stopped_at_step": step}
    return {
        "weights": weights.tolist(),
        "weights_sha256": hashlib.sha256(weights.tobytes()).hexdigest(),
        "mse": _mse(x, y, weights),
        "weight_error": float(np.max(np.abs(weights - true_weights))),
    }
