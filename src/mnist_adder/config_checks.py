"""The one place where config values are checked: before anything is built, one line per bad value.

Every check names the key, the value given and what is allowed, so a typo never costs a run. Keys a
config does not have are skipped, so the eval and predict entry points can call `check_config` too.
The training-set size is only known once MNIST is read, so the datamodule calls `check_val_size` again
then, with that size.
"""

import math
from numbers import Real
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mnist_adder.errors import UserError

_MISSING = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(key: str, value: Any, allowed: str) -> str:
    return f"{key}={value!r} is not allowed: {allowed}"


def val_size_problem(val_size: Any, n_train: int | None = None) -> str | None:
    """Why `data.val_size` is wrong (None if it is fine); `n_train` is the training set's size if known."""
    upper = f" and less than {n_train}, the number of training images" if n_train is not None else ""
    if not _is_int(val_size) or val_size < 1 or (n_train is not None and val_size >= n_train):
        return _bad("data.val_size", val_size, f"it must be a whole number of at least 1{upper}")
    return None


def check_val_size(val_size: Any, n_train: int) -> None:
    """Raise a UserError unless 1 <= val_size < n_train."""
    problem = val_size_problem(val_size, n_train)
    if problem is not None:
        raise UserError(f"{problem}.")


def config_problems(cfg: DictConfig) -> list[str]:
    """Every bad value in `cfg`, one sentence each (empty when all is well)."""

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=_MISSING)

    problems = []
    lr = get("model.optimizer.lr")
    if lr is not _MISSING and not (_is_number(lr) and lr > 0):
        problems.append(_bad("model.optimizer.lr", lr, "the learning rate must be a number > 0"))
    for key in ("data.batch_size", "data.eval_batch_size"):
        value = get(key)
        if value is not _MISSING and not (_is_int(value) and value >= 1):
            problems.append(_bad(key, value, "a batch size must be a whole number of at least 1"))
    weights = {key: get(key) for key in ("model.digit_weight", "model.sum_weight")}
    for key, value in weights.items():
        if value is not _MISSING and not (_is_number(value) and value >= 0):
            problems.append(_bad(key, value, "a loss weight must be a number >= 0"))
    if all(_is_number(value) and value == 0 for value in weights.values()):
        problems.append(
            "model.digit_weight=0 and model.sum_weight=0 are not allowed together: "
            "at least one must be > 0, or the loss is 0 and nothing trains"
        )
    val_size = get("data.val_size")
    if val_size is not _MISSING and (problem := val_size_problem(val_size)) is not None:
        problems.append(problem)
    max_epochs = get("trainer.max_epochs")
    # None leaves the choice to Lightning (max_steps decides); anything given must be a real count.
    if (
        max_epochs is not _MISSING
        and max_epochs is not None
        and not (_is_int(max_epochs) and max_epochs >= 1)
    ):
        problems.append(_bad("trainer.max_epochs", max_epochs, "it must be a whole number of at least 1"))
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raise one UserError (a single line) naming every bad value, before any data or model is built."""
    problems = config_problems(cfg)
    if problems:
        raise UserError("; ".join(problems) + ".")
