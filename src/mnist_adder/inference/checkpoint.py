"""Loading a training checkpoint alone: its stored run config rebuilds the model, then the weights go in.

Every tool that uses a trained model (eval, predict, export) loads it here, so they all accept and refuse
the same files with the same messages. What is fitted after training (the temperatures) is written into
a checkpoint here too (`write_fitted_checkpoint`), by training and by scripts/calibrate.py alike.
"""

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from mnist_adder.errors import UserError
from mnist_adder.models.not_digit import EARLIER_BUFFERS
from mnist_adder.results import atomic_path
from mnist_adder.training.module import DigitSumModule

log = logging.getLogger(__name__)

HOW_TO_GET_ONE = (
    "Pass the .ckpt file of a training run, e.g. ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt "
    "(metrics.json of the run names the best one)."
)


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist. {HOW_TO_GET_ONE}")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a file. {HOW_TO_GET_ONE}")
    try:
        # weights_only: a checkpoint is user input, so it is unpickled without running arbitrary code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # garbage makes the unpickler fail in many ways; all mean "not a checkpoint"
        raise UserError(
            f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}). "
            f"{HOW_TO_GET_ONE}"
        ) from err
    return checkpoint if isinstance(checkpoint, dict) else {}


def _stored_config(checkpoint: dict[str, Any], path: Path) -> DictConfig:
    hyper_parameters = checkpoint.get("hyper_parameters")
    config = hyper_parameters.get("config") if isinstance(hyper_parameters, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"{path} is not a checkpoint of mnist-adder: it has no run config with a model "
            f"(hyper_parameters['config']['model']) or no weights. {HOW_TO_GET_ONE}"
        )
    return OmegaConf.create(config)


def load_checkpoint(path: str | Path) -> tuple[DigitSumModule, DictConfig]:
    """(the model in eval mode on the CPU, the run config it was trained with) from a training checkpoint.

    Raises UserError for a missing file, a folder, a file that is no checkpoint, or the checkpoint of
    another project.
    """
    path = Path(path)
    checkpoint = _read(path)
    config = _stored_config(checkpoint, path)
    try:
        module = hydra.utils.instantiate(config.model)
    except Exception as err:  # a model this version of the code cannot build: say so, not a traceback
        raise UserError(
            f"the model stored in {path} cannot be built by this version of mnist-adder "
            f"({type(err).__name__}: {str(err).splitlines()[0]})."
        ) from err
    if not isinstance(module, DigitSumModule):
        raise UserError(f"{path} holds a {type(module).__name__}, not a mnist-adder DigitSumModule.")
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise UserError(
            f"the weights in {path} do not fit the model its config describes: {str(err).splitlines()[0]}"
        ) from err
    if any(f"net.not_digit.{name}" in checkpoint["state_dict"] for name in EARLIER_BUFFERS):
        log.warning(
            "%s holds the earlier not-a-digit detector (a linear discriminant), which this version no "
            "longer reads: it refuses nothing. Fit the current one with python scripts/calibrate.py "
            "ckpt_path=%s",
            path,
            path,
        )
    return module.eval(), config


def write_fitted_checkpoint(
    source: str | Path, target: str | Path, module: DigitSumModule, records: dict[str, Any]
) -> Path:
    """Write the checkpoint `source` to `target` (which may be `source` itself) with the weights and
    buffers of `module` and each of `records` as a top-level entry (e.g. {"calibration": {...}}).

    `module` holds the weights read from `source` plus what was fitted on them after training (the
    temperatures are buffers of the net), so the file then holds exactly the model that is tested and
    handed over. The rest (run config, the raw weights and optimizer and callback states for resuming)
    stays as it was. Written atomically, as the training checkpoints: a reader, or a run killed meanwhile,
    sees the old file or the whole new one.
    """
    checkpoint = _read(Path(source))
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
