"""Loading a training checkpoint alone: its stored run config rebuilds the model, then the weights go in.

Every tool that uses a trained model (eval, calibrate, predict, export, the demo, benchmark) loads it
here, so they all accept and refuse the same files with the same messages; eval and calibrate rebuild the
run's data and trainer here too (`run_datamodule`, `evaluation_trainer`). A checkpoint holds a task
(`TaskModule.task`); a tool, or one of its keys, that serves only some tasks names them (`tasks`), and a
checkpoint of another task is refused with one line.
"""

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from mnist_adder.checkpoint_file import HOW_TO_GET_ONE, read_checkpoint
from mnist_adder.cli import build
from mnist_adder.config_checks import accelerator_problem, check_config
from mnist_adder.errors import UserError
from mnist_adder.training.task import TASK_TITLES, TaskModule

log = logging.getLogger(__name__)


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


def load_checkpoint(
    path: str | Path, tasks: Collection[str] | None = None, used_by: str = "", hint: str = ""
) -> tuple[TaskModule, DictConfig]:
    """(the model in eval mode on the CPU, the run config it was trained with) from a training checkpoint.

    Raises UserError for a missing file, a folder, a file that is no checkpoint, the checkpoint of
    another project, or one of a task not in `tasks` (None: any task), naming `used_by` (what refuses it,
    e.g. "scripts/calibrate.py") and saying `hint` (what to do instead).
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    config = _stored_config(checkpoint, path)
    try:
        module = hydra.utils.instantiate(config.model)
    except Exception as err:  # a model this version of the code cannot build: say so, not a traceback
        raise UserError(
            f"the model stored in {path} cannot be built by this version of mnist-adder "
            f"({type(err).__name__}: {str(err).splitlines()[0]})."
        ) from err
    if not isinstance(module, TaskModule):
        raise UserError(f"{path} holds a {type(module).__name__}, not a model of a mnist-adder task.")
    if tasks is not None and module.task not in tasks:
        served = " or ".join(TASK_TITLES[task] for task in tasks)
        raise UserError(
            f"{path} is a checkpoint of {TASK_TITLES[module.task]}, and {used_by or 'this command'} "
            f"works on checkpoints of {served} only: {hint or 'pass one of those (docs/using-a-model.md)'}."
        )
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise UserError(
            f"the weights in {path} do not fit the model its config describes: {str(err).splitlines()[0]}"
        ) from err
    return module.eval(), config


def load_given_checkpoint(
    cfg: DictConfig, script: str, tasks: Collection[str] | None = None, used_by: str = ""
) -> tuple[Path, TaskModule, DictConfig]:
    """(its resolved path, the model, its run config) of `cfg.ckpt_path`, after `check_config(cfg)`; a
    UserError naming `script` (scripts/<script>.py) when no checkpoint is given. `tasks`, `used_by`: as
    `load_checkpoint`'s (`used_by` defaults to the script)."""
    check_config(cfg)
    if not cfg.get("ckpt_path"):
        raise UserError(
            f"no checkpoint given: python scripts/{script}.py ckpt_path=<file.ckpt>. {HOW_TO_GET_ONE}"
        )
    ckpt_path = Path(cfg.ckpt_path).resolve()
    return ckpt_path, *load_checkpoint(ckpt_path, tasks, used_by or f"scripts/{script}.py")


def evaluation_trainer(stored: DictConfig, cfg: DictConfig, output_dir: Path) -> pl.Trainer:
    """The checkpoint's own trainer config, on one device, without callbacks, loggers or checkpoints."""
    overrides: dict[str, Any] = {
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "sync_batchnorm": False,
        "fast_dev_run": False,
        "logger": False,
        "callbacks": [],
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "default_root_dir": str(output_dir),
        "enable_progress_bar": cfg.trainer.enable_progress_bar,
    }
    for key in ("accelerator", "precision"):
        if cfg.trainer.get(key) is not None:
            overrides[key] = cfg.trainer[key]
    # The checkpoint's accelerator may be one this machine lacks (trained on a GPU, tested on a laptop).
    problem = accelerator_problem(overrides.get("accelerator", stored.get("accelerator")), by_group=False)
    if problem is not None:
        raise UserError(
            f"{problem} (the checkpoint was trained with accelerator={stored.get('accelerator')}; on another "
            "accelerator the numbers may differ from training's in the last digits)."
        )
    return build(stored, "trainer", **overrides)


def run_datamodule(run_config: DictConfig, cfg: DictConfig) -> pl.LightningDataModule:
    """The data as the checkpoint's run saw it (batch sizes, split and pair seeds), read from this
    machine's data folder."""
    data_config = run_config.data.copy()
    data_config.data_dir = cfg.paths.data_dir
    datamodule = build(data_config, "data")
    datamodule.prepare_data()
    return datamodule
