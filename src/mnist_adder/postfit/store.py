"""Storing what was fitted on trained weights: in the checkpoint that is handed over.

Training writes into the selected checkpoint itself (`<run>/checkpoints/epoch_NNN.ckpt`, the file
metrics.json's ckpt_path names), rewritten atomically, so that the file the checkpoint callback calls
best, and that eval, predict, export and the demo are given, is the calibrated one; a sibling would
leave an uncalibrated twin under that name. A run never rewrites another run's file: a selected checkpoint
outside its folder gets its calibrated copy in this run's `checkpoints/`. `last.ckpt` is not touched,
so resuming stays exact. scripts/calibrate.py writes `<name>.calibrated.ckpt` beside the user's file.
"""

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from mnist_adder.checkpoint_file import read_checkpoint
from mnist_adder.errors import UserError
from mnist_adder.results import atomic_path


def write_fitted_checkpoint(
    source: str | Path, target: str | Path, module: nn.Module, records: dict[str, Any]
) -> Path:
    """Write the checkpoint `source` to `target` (which may be `source` itself) with the weights and
    buffers of `module` and each of `records` as a top-level entry (e.g. {"calibration": {...}}).

    `module` holds the weights read from `source` plus what was fitted on them (the temperatures and the
    detector are buffers of the net), so the file then holds exactly the model that is tested and handed
    over. The rest (run config, the raw weights and optimizer and callback states for resuming) stays as
    it was. Written atomically: a reader, or a run killed meanwhile, sees the old file or the whole new one.
    """
    checkpoint = read_checkpoint(source)
    checkpoint["state_dict"] = {
        name: value.detach().cpu().clone() for name, value in module.state_dict().items()
    }
    checkpoint |= records
    try:
        with atomic_path(target) as tmp:
            torch.save(checkpoint, tmp)
    except OSError as err:
        raise UserError(
            f"could not write {target}: {err.strerror or err}; it was left as it was (no partial file). "
            "Free disk space or make the folder writable."
        ) from err
    return Path(target)


def handed_over_path(selected: str | Path, output_dir: Path) -> Path:
    """Where the selected checkpoint with its fitted state goes: the file itself when it is this run's,
    else a file of the same name in this run's `checkpoints/`."""
    selected = Path(selected).resolve()
    if selected.is_relative_to(Path(output_dir).resolve()):
        return selected
    return Path(output_dir).resolve() / "checkpoints" / selected.name


def store_post_training(
    trainer: pl.Trainer, selected: str, output_dir: Path, module: nn.Module, fitted: dict[str, Any]
) -> str:
    """Write `module` (the selected weights and what was fitted on them) and the records of `fitted` into
    the checkpoint handed over (`handed_over_path`); return its path. One process writes, all wait."""
    target = handed_over_path(selected, output_dir)
    if trainer.is_global_zero:
        write_fitted_checkpoint(selected, target, module, fitted)
    trainer.strategy.barrier("post_training")  # every process then tests the file as written
    return str(target)
