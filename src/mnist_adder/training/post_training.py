"""What a training run fits after `fit`, on the weights it selected, before its final test.

Today that is temperature scaling (`calibrate: true` in conf/train.yaml): both heads' temperatures,
fitted on the validation split by `inference.calibrate.fit_temperatures`, the step scripts/calibrate.py
runs on older checkpoints; and the "not a digit" detector (`not_digit_accept: 0.99`), fitted by
`analysis.not_digit.fit_not_digit_detector`, which scripts/calibrate.py runs too. Whatever else is
fitted on trained weights belongs in `fit_post_training` too: it sets what it fits in the module (as
buffers of the net, so that it travels in checkpoints and exports) and returns a record of it by name,
stored in the checkpoint under that name.

Where it is stored: in the selected checkpoint itself (`<run>/checkpoints/epoch_NNN.ckpt`, the file
metrics.json's ckpt_path names), rewritten atomically, not in a sibling file. The file that the
checkpoint callback calls best, that a user finds in the checkpoints folder, and that eval, predict,
export and the demo are given is then the calibrated one; a sibling would leave an uncalibrated twin
under the name people and the callback's records use. It is the run's own file, written by its
checkpoint callback moments before; a run never rewrites another run's: a selected checkpoint outside
this run's folder (a checkpoint folder set elsewhere) gets its calibrated copy in this run's
`checkpoints/` instead. Resuming stays exact: `last.ckpt` is not touched, and a run that trains on
from a calibrated checkpoint trains at temperature 1 (`DigitSumModule.on_load_checkpoint`) and fits the
temperatures again at its own end.
"""

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from mnist_adder.analysis.not_digit import DEFAULT_ACCEPT, fit_not_digit_detector
from mnist_adder.inference.calibrate import fit_temperatures
from mnist_adder.inference.checkpoint import write_fitted_checkpoint
from mnist_adder.training.module import DigitSumModule


def fit_post_training(
    module: DigitSumModule, datamodule: pl.LightningDataModule, cfg: DictConfig
) -> dict[str, Any]:
    """Fit everything that is fitted on the trained weights in `module` and set it there; return a record
    of each fitted thing by name (empty when nothing is to be fitted), e.g. {"calibration": {...}}.

    `datamodule`: the run's data, not attached to a trainer (the whole splits, as scripts/calibrate.py
    sees them).
    """
    fitted: dict[str, Any] = {}
    if cfg.get("calibrate", True):
        fitted["calibration"] = fit_temperatures(module, datamodule)  # sets up the datamodule's splits
    accept = cfg.get("not_digit_accept", DEFAULT_ACCEPT)
    if accept is not None:
        datamodule.setup("fit")  # the splits, where the temperatures did not set them up (calibrate=false)
        # The "not a digit" detector: statistics on the training split, threshold on validation digits.
        fitted["not_digit"] = fit_not_digit_detector(
            module.net, datamodule.split_tensors("train"), datamodule.split_tensors("val"), accept
        )
    return fitted


def load_weights(module: DigitSumModule, ckpt_path: str | Path) -> None:
    """Put the weights of a checkpoint of this run into `module`, as the test would restore them."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"])


def handed_over_path(selected: str | Path, output_dir: Path) -> Path:
    """Where the selected checkpoint with its fitted state goes: the file itself when it is this run's,
    else a file of the same name in this run's `checkpoints/`."""
    selected = Path(selected).resolve()
    if selected.is_relative_to(Path(output_dir).resolve()):
        return selected
    return Path(output_dir).resolve() / "checkpoints" / selected.name


def store_post_training(
    trainer: pl.Trainer, selected: str, output_dir: Path, module: DigitSumModule, fitted: dict[str, Any]
) -> str:
    """Write `module` (the selected weights and what was fitted on them) and the records of `fitted` into
    the checkpoint handed over (`handed_over_path`); return its path. One process writes, all wait."""
    target = handed_over_path(selected, output_dir)
    if trainer.is_global_zero:
        write_fitted_checkpoint(selected, target, module, fitted)
    trainer.strategy.barrier("post_training")  # every process then tests the file as written
    return str(target)
