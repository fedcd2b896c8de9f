"""The one place where config values are checked: before anything is built, one line per bad value.

Every check names the key, the value given and what is allowed, so a typo never costs a run. Keys a
config does not have are skipped, so the eval and benchmark entry points call `check_config` too. The
accelerator is checked against this machine (`trainer=gpu` where no CUDA GPU is visible). What only a
constructor can judge is reported by `cli.build`, in the same one-line form.
The training-set size is only known once MNIST is read, so the datamodule calls `check_val_size` again
then, with that size. `check_resume` checks a `ckpt_path` to resume from against the config.
"""

import math
from numbers import Real
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mnist_adder.adder_inputs import ADDER_INPUTS, accepted_adder_inputs
from mnist_adder.checkpoint_file import torch_load
from mnist_adder.classes import NUM_DIGITS
from mnist_adder.devices import CUDA_ACCELERATORS, has_cuda, has_mps, machine_accelerators
from mnist_adder.errors import UserError
from mnist_adder.heldout import HELDOUT_PRESETS, heldout_pair_list

_MISSING = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_interpolation(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def _bad(key: str, value: Any, allowed: str) -> str:
    return f"{key}={value!r} is not allowed: {allowed}"


# pl.seed_everything and torch.Generator take seeds in numpy's range; Lightning replaces one outside it
# by 0 with a warning, which would silently train another run than the one asked for.
MAX_SEED = 2**32 - 1
SEED_KEYS = ("seed", "data.seed", "data.split_seed", "data.pair_seed")


# torch.compile's modes, for model.compile_mode (None: torch's default); training/step_speed.py uses them.
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# What `reject_threshold` (predict, demo, eval) may be.
REJECT_THRESHOLD_CHOICES = (
    "null (the threshold stored in the checkpoint), a number (refuse images whose not-a-digit score is "
    "above it) or off (refuse none)"
)


def reject_threshold_off(value: Any) -> bool:
    """Whether `reject_threshold` turns "not a digit" off: off (any case) or false."""
    return value is False or (isinstance(value, str) and value.strip().lower() == "off")


def reject_threshold_problem(value: Any) -> str | None:
    """Why `reject_threshold` is not allowed (None if it is)."""
    if value is None or reject_threshold_off(value) or _is_number(value):
        return None
    return _bad("reject_threshold", value, REJECT_THRESHOLD_CHOICES)


def check_reject_threshold(value: Any) -> None:
    """Raise UserError (one line) unless `reject_threshold` is null, a number, off or false."""
    problem = reject_threshold_problem(value)
    if problem is not None:
        raise UserError(f"{problem}.")


# Hyperparameters are chosen on validation results only: the test set stays the final, untouched check.
SELECTABLE_PREFIXES = ("val/", "best_val/")


def optimized_metric_problem(name: Any) -> str | None:
    """Why `optimized_metric` (what a search optimises) is not allowed (None if it is)."""
    if name is None or str(name).startswith(SELECTABLE_PREFIXES):
        return None
    return (
        f"optimized_metric={name!r}: a search may only optimise a validation metric (names starting "
        f"with {' or '.join(SELECTABLE_PREFIXES)}, e.g. best_val/both_acc), never the test set, "
        "which is kept for the final result"
    )


def accelerator_problem(accelerator: Any, by_group: bool) -> str | None:
    """Why `trainer.accelerator` cannot run on this machine (None if it can, or if Lightning must judge).

    `by_group`: the trainer config is a group choice (train, benchmark: suggest `trainer=cpu`); otherwise
    only its keys can be set (eval: suggest `trainer.accelerator=cpu`).
    """
    name = str(accelerator).lower()
    if name in CUDA_ACCELERATORS and not has_cuda():
        needs = "a CUDA GPU"
        instead = ["mps", "auto"] if has_mps() else ["cpu", "auto"]
    elif name == "mps" and not has_mps():
        needs = "an Apple MPS device"
        instead = ["gpu", "auto"] if has_cuda() else ["cpu", "auto"]
    else:
        return None
    choose = "trainer=" if by_group else "trainer.accelerator="
    chosen = HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None
    given = f" (trainer={chosen})" if by_group and chosen else ""
    return (
        f"trainer.accelerator={accelerator}{given} needs {needs}, and this machine has "
        f"{machine_accelerators()}: run with {choose}{instead[0]} instead, "
        f"or {choose}auto to take the best this machine has"
    )


def val_size_problem(val_size: Any, n_train: int | None = None, minimum: int = 1) -> str | None:
    """Why `data.val_size` is wrong (None if it is fine); `n_train` is the training set's size if known.
    `minimum`: 0 where a task can train without a validation split (MNIST addition's protocol runs)."""
    upper = f" and less than {n_train}, the number of training images" if n_train is not None else ""
    if not _is_int(val_size) or val_size < minimum or (n_train is not None and val_size >= n_train):
        return _bad("data.val_size", val_size, f"it must be a whole number of at least {minimum}{upper}")
    return None


def check_val_size(val_size: Any, n_train: int, minimum: int = 1) -> None:
    """Raise a UserError unless minimum <= val_size < n_train."""
    problem = val_size_problem(val_size, n_train, minimum)
    if problem is not None:
        raise UserError(f"{problem}.")


def addition_digits_problem(digits: Any, n_images: int | None = None, images: str = "") -> str | None:
    """Why `data.digits` (MNIST addition's N) is wrong (None if fine); `n_images`: the size of the split
    `images` names, if known, which must hold at least one example of 2N images."""
    if not _is_int(digits) or digits < 1:
        return _bad("data.digits", digits, "the digits of each number, a whole number of at least 1")
    if n_images is not None and 2 * digits > n_images:
        return _bad(
            "data.digits",
            digits,
            f"an example is 2N = {2 * digits} images and the {n_images} {images} make none; "
            f"at most {n_images // 2} digits",
        )
    return None


def setting_for_digits(schedule: Any, digits: Any, key: str) -> Any:
    """`key` of MNIST addition's per-N schedule (conf/data/mnist_addition.yaml, `addition_schedule`) for N =
    `digits`: the row of N itself, else of the largest listed N below it (the smallest listed N for an N
    below every row). An N that is no whole number >= 1 gets the smallest row, so that the config still
    resolves and `data.digits` is refused by `config_problems` in one line, not by a traceback here."""
    rows = {int(n): row for n, row in dict(schedule).items()}
    below = [n for n in rows if _is_int(digits) and n <= digits]
    return rows[max(below) if below else min(rows)][key]


def check_addition_digits(digits: Any, n_images: int | None = None, images: str = "") -> None:
    """Raise a UserError unless `data.digits` is a whole number >= 1 leaving at least one example in a
    split of `n_images` images (when given)."""
    problem = addition_digits_problem(digits, n_images, images)
    if problem is not None:
        raise UserError(f"{problem}.")


def heldout_pairs_problem(value: Any) -> str | None:
    """Why `data.heldout_pairs` is wrong (None if fine): null, a preset name, or [digit, number] pairs."""
    presets = ", ".join(HELDOUT_PRESETS)
    allowed = (
        f"give a list of [digit, number] pairs with both in 0..{NUM_DIGITS - 1}, e.g. [[3,4],[7,2]], "
        f"a preset ({presets}), or null to hold out nothing"
    )
    if value is None:
        return None
    if isinstance(value, str):
        known = value in HELDOUT_PRESETS
        return None if known else _bad("data.heldout_pairs", value, f"unknown preset; {allowed}")
    shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(shown, list | tuple) or not all(
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and all(_is_int(v) and 0 <= v < NUM_DIGITS for v in pair)
        for pair in shown
    ):
        return _bad("data.heldout_pairs", shown, allowed)
    pairs = set(heldout_pair_list(shown))
    for kept, partners in (("digit", "numbers"), ("number", "digits")):
        # A digit whose every number is held out could be paired with none; a number whose every digit
        # is held out would never reach training at all.
        column = 0 if kept == "digit" else 1
        held = [sum(pair[column] == value for pair in pairs) for value in range(NUM_DIGITS)]
        full = [str(value) for value, count in enumerate(held) if count == NUM_DIGITS]
        if full:
            return _bad(
                "data.heldout_pairs",
                shown,
                f"it holds out all {NUM_DIGITS} {partners} of {kept} {', '.join(full)}, which then has no "
                f"partner in training; leave at least one {partners.removesuffix('s')} per {kept}",
            )
    return None


def check_heldout_pairs(value: Any) -> None:
    """Raise a UserError unless `value` is a valid `data.heldout_pairs`."""
    problem = heldout_pairs_problem(value)
    if problem is not None:
        raise UserError(f"{problem}.")


def adder_input_problem(adder_target: Any, adder_input: Any, adder_choice: str | None) -> str | None:
    """Why the adder `adder_target` cannot add `adder_input` (None if it can, or if the value is unknown:
    DigitSumNet names the allowed values then). `adder_choice`: its model/adder choice, if known."""
    if not isinstance(adder_target, str) or adder_input not in ADDER_INPUTS:
        return None
    accepted = accepted_adder_inputs(adder_target)
    if adder_input in accepted:
        return None
    adder = f"model/adder={adder_choice} ({adder_target})" if adder_choice else adder_target
    return (
        f"model.net.adder_input={adder_input} cannot feed {adder}, which adds the digit's probabilities: "
        f"set {' or '.join(f'model.net.adder_input={value}' for value in accepted)}, "
        "or choose an adder that takes logits (model/adder=mlp)"
    )


def config_problems(cfg: DictConfig) -> list[str]:
    """Every bad value in `cfg`, one sentence each (empty when all is well)."""

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=_MISSING)

    problems = []
    for key in SEED_KEYS:
        value = get(key)
        if _is_interpolation(cfg, key):
            continue  # data.seed: ${seed} is checked as seed, not reported twice
        if value is not _MISSING and not (_is_int(value) and 0 <= value <= MAX_SEED):
            problems.append(_bad(key, value, f"a seed must be a whole number from 0 to {MAX_SEED}"))
    accelerator = get("trainer.accelerator")
    if accelerator is not _MISSING and accelerator is not None:
        problem = accelerator_problem(accelerator, by_group=get("trainer._target_") is not _MISSING)
        if problem is not None:
            problems.append(problem)
    lr = get("model.optimizer.lr")
    if lr is not _MISSING and not (_is_number(lr) and lr > 0):
        problems.append(_bad("model.optimizer.lr", lr, "the learning rate must be a number > 0"))
    for key in ("data.batch_size", "data.eval_batch_size"):
        value = get(key)
        if value is not _MISSING and not (_is_int(value) and value >= 1):
            problems.append(_bad(key, value, "a batch size must be a whole number of at least 1"))
    examples_per_step = get("data.examples_per_step")
    if examples_per_step not in (_MISSING, None) and not (
        _is_int(examples_per_step) and examples_per_step >= 1
    ):
        problems.append(_bad("data.examples_per_step", examples_per_step, "a whole number of at least 1"))
    weights = {key: get(key) for key in ("model.digit_weight", "model.sum_weight")}
    for key, value in weights.items():
        if value is not _MISSING and not (_is_number(value) and value >= 0):
            problems.append(_bad(key, value, "a loss weight must be a number >= 0"))
    if all(_is_number(value) and value == 0 for value in weights.values()):
        problems.append(
            "model.digit_weight=0 and model.sum_weight=0 are not allowed together: "
            "at least one must be > 0, or the loss is 0 and nothing trains"
        )
    adder_input = get("model.net.adder_input")
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    problem = adder_input_problem(get("model.net.adder._target_"), adder_input, choices.get("model/adder"))
    if problem is not None:
        problems.append(problem)
    digit_weight = weights["model.digit_weight"]
    if adder_input == "detached" and _is_number(digit_weight) and digit_weight == 0:
        problems.append(
            "model.digit_weight=0 with model.net.adder_input=detached trains no part of the backbone: "
            "the digit loss is off and the sum loss is stopped before it; "
            "set model.net.adder_input=softmax (or a model.digit_weight > 0)"
        )
    metric = get("optimized_metric")
    if metric is not _MISSING and (problem := optimized_metric_problem(metric)) is not None:
        problems.append(problem)
    val_size = get("data.val_size")
    addition_data = str(get("data._target_")).endswith(".MnistAdditionDataModule")
    val_size_minimum = 0 if addition_data else 1  # MNIST addition's protocol runs keep no validation
    if val_size is not _MISSING and (problem := val_size_problem(val_size, minimum=val_size_minimum)):
        problems.append(problem)
    if val_size == 0 and get("callbacks.model_checkpoint.monitor") not in (None, _MISSING):
        problems.append(
            "data.val_size=0 leaves nothing to validate on, so no checkpoint can be selected: "
            "experiment=addition_protocol trains on every training image and hands over the last epoch's "
            "weights; run python scripts/train.py experiment=addition_protocol data.digits=N"
        )
    heldout_pairs = get("data.heldout_pairs")
    if heldout_pairs is not _MISSING and (problem := heldout_pairs_problem(heldout_pairs)) is not None:
        problems.append(problem)
    # model=addition reads examples of 2N images, which only data=mnist_addition makes (it sets the model).
    addition_model = str(get("model._target_")).endswith(".NumberAdditionModule")
    if get("data._target_") is not _MISSING and addition_model != addition_data:
        problems.append(
            "model=addition goes with data=mnist_addition only (which chooses it): "
            "run python scripts/train.py data=mnist_addition data.digits=N"
            if addition_model
            else "data=mnist_addition trains model=addition only (the backbone is the choice there: "
            "model/backbone=conv or lenet); leave out the model=... override"
        )
    digits = get("data.digits")
    if digits is not _MISSING and (problem := addition_digits_problem(digits)) is not None:
        problems.append(problem)
    max_epochs = get("trainer.max_epochs")
    # None leaves the choice to Lightning (max_steps decides); anything given must be a real count.
    if (
        max_epochs is not _MISSING
        and max_epochs is not None
        and not (_is_int(max_epochs) and max_epochs >= 1)
    ):
        problems.append(_bad("trainer.max_epochs", max_epochs, "it must be a whole number of at least 1"))
    for key in ("model.compile", "model.channels_last"):
        flag = get(key)
        if flag is not _MISSING and not isinstance(flag, bool):
            problems.append(_bad(key, flag, "it must be true or false"))
    compile_mode = get("model.compile_mode")
    if compile_mode is not _MISSING and compile_mode not in COMPILE_MODES:
        modes = ", ".join(str(mode) for mode in COMPILE_MODES[1:])
        problems.append(_bad("model.compile_mode", compile_mode, f"null (torch's default) or one of {modes}"))
    for key in ("robustness", "calibrate", "not_digits", "not_digits_unseen"):
        flag = get(key)
        if flag is not _MISSING and not isinstance(flag, bool):
            problems.append(_bad(key, flag, "it must be true or false"))
    for key in ("robustness_seed", "not_digits_seed"):
        seed = get(key)
        if seed is not _MISSING and not _is_int(seed):
            problems.append(_bad(key, seed, "it must be a whole number"))
    robustness_images = get("robustness_images")
    if robustness_images not in (_MISSING, None) and not (
        _is_int(robustness_images) and robustness_images >= 1
    ):
        problems.append(
            _bad(
                "robustness_images",
                robustness_images,
                "it must be null (all) or a whole number of at least 1",
            )
        )
    threshold = get("reject_threshold")
    if threshold is not _MISSING and (problem := reject_threshold_problem(threshold)) is not None:
        problems.append(problem)
    accept = get("not_digit_accept")
    # null fits no detector in training and scripts/calibrate.py; eval sets its baselines' thresholds by it.
    no_detector = accept is None and get("task_name") != "eval"
    if accept is not _MISSING and not no_detector and not (_is_number(accept) and 0 < accept < 1):
        problems.append(
            _bad(
                "not_digit_accept",
                accept,
                "the share of validation digits the threshold accepts, a number between 0 and 1 "
                "(0.99 accepts 99 %)",
            )
        )
    # Lightning refuses a progress-bar callback with the progress bar turned off, with a traceback.
    callbacks = get("callbacks")
    if get("trainer.enable_progress_bar") is False and OmegaConf.is_dict(callbacks):
        bars = [
            name
            for name, entry in callbacks.items()
            if OmegaConf.is_dict(entry) and str(entry.get("_target_", "")).endswith("ProgressBar")
        ]
        if bars:
            problems.append(
                f"callbacks.{bars[0]} (a progress bar, from callbacks=[...,rich]) needs the progress bar on, "
                "but trainer.enable_progress_bar=false: set trainer.enable_progress_bar=true "
                "(trainer=debug turns it off)"
            )
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raise one UserError (a single line) naming every bad value, before any data or model is built."""
    problems = config_problems(cfg)
    if problems:
        raise UserError("; ".join(problems) + ".")


# What a resumed run must share with the run that saved its checkpoint: the model and its optimizer,
# the training data and pairing, the seed, and what sizes the one-cycle schedule (its length is in
# the checkpoint, and stepping past it is an error). Paths, logging, callbacks and evaluation may change.
RESUME_KEYS = (
    "seed",
    "model",
    "data",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.limit_train_batches",
    "trainer.accumulate_grad_batches",
)
RESUME_FREE_KEYS = frozenset({"data.data_dir", "data.download", "data.on_device", "data.eval_batch_size"})


def _flatten(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flatten(item, f"{key}.{name}").items()}
    return {key: value}


def _values(config: DictConfig | dict, key: str) -> dict[str, Any]:
    if isinstance(config, DictConfig):
        value = OmegaConf.select(config, key, default=None)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    else:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    return {k: v for k, v in _flatten(value, key).items() if k not in RESUME_FREE_KEYS}


def resume_problems(cfg: DictConfig, saved: dict[str, Any]) -> list[str]:
    """How `cfg` differs from `saved`, the config stored in the checkpoint, where a resume needs the same."""
    problems = []
    for key in RESUME_KEYS:
        here, there = _values(cfg, key), _values(saved, key)
        for name in sorted(set(here) | set(there)):
            if here.get(name) != there.get(name):
                problems.append(f"{name} is {there.get(name)!r} there, {here.get(name)!r} here")
    return problems


def _original_overrides(ckpt_path: Path) -> str | None:
    overrides = ckpt_path.resolve().parent.parent / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return None
    saved = OmegaConf.load(overrides)
    return " ".join(str(o) for o in saved if not str(o).startswith(("ckpt_path=", "hydra.")))


def check_resume(cfg: DictConfig) -> None:
    """If `cfg.ckpt_path` is set: a UserError unless it is a readable checkpoint of a run with this config."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(
            f"ckpt_path={ckpt_path} is not a file: give the checkpoint to resume from, "
            "e.g. ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt."
        )
    try:  # mmap: the weights are not read, only the config
        checkpoint = torch_load(path, mmap=True)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise UserError(
            f"ckpt_path={ckpt_path} cannot be read as a checkpoint ({type(err).__name__}: {err})."
        ) from err
    saved = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    problems = resume_problems(cfg, saved) if saved else []
    if problems:
        original = _original_overrides(path)
        hint = f" That run's overrides were: {original or '(none)'}." if original is not None else ""
        raise UserError(
            f"ckpt_path={ckpt_path} was saved by a run with another config, and a resumed run must train "
            f"the same: {'; '.join(problems)}. Resume with the overrides of that run.{hint}"
        )
