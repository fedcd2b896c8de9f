"""What scripts/train.py gives back to a Hydra sweeper: one number, cfg.optimized_metric of the run."""

import math
from typing import Any

from omegaconf import DictConfig

from mnist_adder.config_checks import check_config
from mnist_adder.errors import UserError


def optimized_value(results: dict[str, Any], name: str | None) -> float | None:
    """results[name] as a float, for the sweeper; None when no metric is asked for."""
    if name is None:
        return None
    value = results.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        known = ", ".join(sorted(k for k, v in results.items() if isinstance(v, float)))
        raise UserError(
            f"optimized_metric={name!r} has no value in this run's results (numeric results: {known}). "
            "best_val/* needs the checkpoint callback (callbacks=default) and at least one validation."
        )
    return float(value)


def train_and_score(cfg: DictConfig) -> float | None:
    """Train as `cfg` says and return `cfg.optimized_metric` of the results (None when it is null)."""
    check_config(cfg)  # a bad value (a test metric to optimise too) is told before the training stack loads
    from mnist_adder.training.train import train

    return optimized_value(train(cfg), cfg.get("optimized_metric"))
