"""What scripts/train.py gives back to a Hydra sweeper: one number, cfg.optimized_metric of the run."""

import math
from typing import Any

from omegaconf import DictConfig

from mnist_adder.config_checks import check_config
from mnist_adder.errors import UserError

# Hyperparameters are chosen on validation results only: the test set stays the final, untouched check.
SELECTABLE_PREFIXES = ("val/", "best_val/")


def check_optimized_metric(name: str | None) -> None:
    """Refuse, before any training, a metric that a search must not select on."""
    if name is not None and not str(name).startswith(SELECTABLE_PREFIXES):
        raise UserError(
            f"optimized_metric={name!r}: a search may only optimise a validation metric (names starting "
            f"with {' or '.join(SELECTABLE_PREFIXES)}, e.g. best_val/both_acc), never the test set, "
            "which is kept for the final result."
        )


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
    name = cfg.get("optimized_metric")
    check_optimized_metric(name)
    check_config(cfg)  # a bad value is told before the training stack loads (seconds of imports)
    from mnist_adder.training.train import train

    return optimized_value(train(cfg), name)
