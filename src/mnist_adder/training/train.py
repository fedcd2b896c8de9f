"""The training pipeline behind scripts/train.py: checks, run folder, build, fit, select on validation,
fit what is fitted on the selected weights (`mnist_adder.postfit`), test the checkpoint handed over,
write the results."""

import inspect
import logging
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, Timer
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mnist_adder.checkpoint_file import read_checkpoint
from mnist_adder.cli import build
from mnist_adder.config_checks import check_config, check_resume
from mnist_adder.errors import UserError
from mnist_adder.postfit.fit import detector_fit, fit_post_training
from mnist_adder.postfit.not_digit import DEFAULT_ACCEPT, format_not_digit
from mnist_adder.postfit.store import store_post_training
from mnist_adder.postfit.temperature import CHANGED_BY_TEMPERATURE, format_calibration, with_test_results
from mnist_adder.results import format_results, write_run_files
from mnist_adder.training.callbacks import (
    FlushLoggers,
    NonFiniteLossGuard,
    RandomState,
    drop_weight_averaging,
    selected_checkpoint,
)
from mnist_adder.training.config_tree import print_config_tree
from mnist_adder.training.run_dir import claim_run_folder
from mnist_adder.training.scaleout import check_process_launch, lost_peers_stop_clearly
from mnist_adder.training.task import TaskModule

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None, key: str = "") -> list[Any]:
    """Instantiate every entry of a config group that holds several objects (callbacks, loggers)."""
    if not group:
        return []
    return [build(entry, f"{key}.{name}") for name, entry in group.items() if entry is not None]


def _find(callbacks: list[Any], kind: type) -> Any:
    return next((cb for cb in callbacks if isinstance(cb, kind)), None)


def _choice(group: str) -> str | None:
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def _log_config(logger: Logger, config: dict[str, Any], test_metrics: dict[str, float]) -> None:
    """The run's config as the logger's hyperparameters, beside the final test metrics.

    TensorBoard's HPARAMS tab pairs them only when they come in one call (`metrics=`); the other
    loggers (CSV, MLflow, W&B) take the config alone and already have the test metrics, logged by
    `trainer.test`.
    """
    if "metrics" in inspect.signature(logger.log_hyperparams).parameters:
        logger.log_hyperparams(config, metrics=test_metrics)
    else:
        logger.log_hyperparams(config)


def _build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The trainer of `cfg`, with the callbacks that are always on (exact resumes, a stop on a NaN/inf
    loss) whatever the callbacks group, and the loggers."""
    callbacks = [
        *instantiate_group(cfg.get("callbacks"), "callbacks"),
        RandomState(),
        FlushLoggers(),
        NonFiniteLossGuard(),
    ]
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer: pl.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    check_process_launch(trainer)
    return trainer


def _fit(
    trainer: pl.Trainer, module: TaskModule, datamodule: pl.LightningDataModule, ckpt_path: str | None
) -> float | None:
    """`trainer.fit`; return its seconds (None without a Timer). SIGTERM ends the process as killed by it."""
    try:
        with lost_peers_stop_clearly(trainer, "training"):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        # InterruptCheckpoint has saved last.ckpt and logged how to continue; exit as killed by SIGTERM.
        log.error("Training stopped by SIGTERM.")
        raise SystemExit(128 + signal.SIGTERM) from None
    timer = _find(trainer.callbacks, Timer)
    # Read now: testing a checkpoint reloads the Timer's state saved in it.
    return round(timer.time_elapsed("train"), 3) if timer is not None else None


def _test(trainer: pl.Trainer, module: TaskModule, datamodule: Any, ckpt_path: str | None = None) -> dict:
    with lost_peers_stop_clearly(trainer, "testing"):
        return trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]


def _uncalibrated_test(
    trainer: pl.Trainer, module: TaskModule, datamodule: pl.LightningDataModule
) -> tuple[dict[str, float], dict[str, Any]]:
    """The test metrics and reliability bins of the weights in `module` at temperature 1, for
    metrics.json's `*_uncalibrated` keys and calibration.json; the fitted temperatures are set back after.
    The loggers get only the test of the model handed over, so this one is kept from them."""
    temperatures = module.temperatures()
    module.set_temperatures(1.0, 1.0)
    loggers, trainer.loggers = trainer.loggers, []
    try:
        return _test(trainer, module, datamodule), dict(module.calibration_results)
    finally:
        trainer.loggers = loggers
        module.set_temperatures(*temperatures)


def _results(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: TaskModule,
    checkpoint: ModelCheckpoint | None,
    tested: dict[str, float],
    uncalibrated: dict[str, float] | None,
    fitted: dict[str, Any],
    ckpt_path: str,
    fit_seconds: float | None,
) -> dict[str, Any]:
    """metrics.json: the test of the checkpoint handed over, and what the run was."""
    results: dict[str, Any] = {name: float(value) for name, value in tested.items()}
    if module.has_temperatures:
        digit_temperature, sum_temperature = module.temperatures()
        results |= {"digit_temperature": digit_temperature, "sum_temperature": sum_temperature}
    if uncalibrated is not None:
        results |= {
            f"test/{name}_uncalibrated": float(uncalibrated[f"test/{name}"])
            for name in CHANGED_BY_TEMPERATURE
            if f"test/{name}" in uncalibrated
        }
    not_digit = fitted.get("not_digit")
    best_score = checkpoint.best_model_score if checkpoint is not None else None
    # Named after what selected it: best_val/both_acc by default, best_val/sum_acc in MNIST addition;
    # experiment=addition_protocol selects nothing (monitor null: the last epoch is handed over).
    best_key: str | None = "best_val/both_acc"  # None then: fast_dev_run writes no checkpoint
    if checkpoint is not None:
        best_key = f"best_{checkpoint.monitor}" if checkpoint.monitor else None
    results |= {
        "ckpt_path": ckpt_path or None,
        # Above it, an image is refused as not a digit (None: no detector, not_digit_accept=null).
        "not_digit_threshold": not_digit["threshold"] if not_digit else None,
        **({best_key: float(best_score) if best_score is not None else None} if best_key else {}),
        "fit_seconds": fit_seconds,
        "num_parameters": sum(p.numel() for p in module.net.parameters()),
        "precision": str(trainer.precision),  # as run: trainer=auto decides it on the machine
        "model": _choice("model"),
        "seed": cfg.seed,
        "resumed_from": cfg.get("ckpt_path"),
    }
    return results | module.test_result_lists()


def _report(
    trainer: pl.Trainer,
    module: TaskModule,
    results: dict[str, Any],
    calibration: dict[str, Any] | None,
    not_digit: dict[str, Any] | None,
    output_dir: Path,
) -> None:
    """The config and test scalars to the loggers, the summaries to the log, metrics.json and
    calibration.json (scripts/calibrate.py writes it too; the results page draws from it) to the run."""
    test_scalars = {k: v for k, v in results.items() if k.startswith("test/") and isinstance(v, float)}
    for logger in trainer.loggers:
        _log_config(logger, module.hparams["config"], test_scalars)
    if calibration is not None:
        log.info("%s", format_calibration(calibration))
    if not_digit:
        log.info("%s", format_not_digit(not_digit))
    log.info("Results (MNIST test set, fixed pairs):\n%s", format_results(results))
    write_run_files(output_dir, {"metrics.json": results, "calibration.json": calibration})
    log.info("Run folder: %s", output_dir)


def _check_post_training(module: TaskModule, calibrate: bool, accept: float | None) -> None:
    """Refuse, before the fit rather than after it, a post-training fit that the task's net has no place
    for (MNIST addition's has neither temperatures nor a detector)."""
    task = type(module).__name__
    if calibrate and not module.has_temperatures:
        raise UserError(f"calibrate=true: {task} has no temperatures to fit; set calibrate=false")
    if accept is not None and not module.has_not_digit_detector:
        raise UserError(
            f"not_digit_accept={accept}: {task} has no 'not a digit' detector to fit; "
            "set not_digit_accept=null"
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test as `cfg` says; return the results also written to `<output_dir>/metrics.json`."""
    check_config(cfg)  # every bad config value stops the run here, before anything is built
    check_resume(cfg)
    output_dir = claim_run_folder(cfg)
    if cfg.get("extras") and cfg.extras.get("print_config"):
        print_config_tree(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data, "data")
    datamodule.prepare_data()  # a missing dataset stops the run here, before anything is built
    module = build(cfg.model, "model")
    # The resolved config travels in every checkpoint, so a checkpoint alone can rebuild its model.
    module.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)}, logger=False)
    calibrate, accept = cfg.get("calibrate", True), cfg.get("not_digit_accept", DEFAULT_ACCEPT)
    _check_post_training(module, calibrate, accept)
    detector = detector_fit(cfg)  # built now: a refused value stops the run before the fit, not after
    trainer = _build_trainer(cfg)
    fit_seconds = _fit(trainer, module, datamodule, cfg.get("ckpt_path"))

    checkpoint = selected_checkpoint(trainer)
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    drop_weight_averaging(trainer)
    if best_path:  # fast_dev_run writes no checkpoint: the weights in memory are fitted and tested then
        module.load_state_dict(read_checkpoint(best_path)["state_dict"])
    # Post-fit on the whole splits (a datamodule not attached to the trainer), then the test at T = 1.
    fitted = fit_post_training(module.net, build(cfg.data, "data"), calibrate, accept, detector)
    uncalibrated, bins_uncalibrated = (
        _uncalibrated_test(trainer, module, datamodule) if "calibration" in fitted else (None, None)
    )
    ckpt_path = best_path
    if best_path and fitted:
        ckpt_path = store_post_training(trainer, best_path, output_dir, module, fitted)
    tested = _test(trainer, module, datamodule, ckpt_path or None)  # the file handed over, read back

    results = _results(cfg, trainer, module, checkpoint, tested, uncalibrated, fitted, ckpt_path, fit_seconds)
    calibration = None
    if uncalibrated is not None:
        calibration = {"ckpt_path": ckpt_path or None} | with_test_results(
            fitted["calibration"], uncalibrated, tested, (bins_uncalibrated, module.calibration_results)
        )
    if trainer.is_global_zero:
        _report(trainer, module, results, calibration, fitted.get("not_digit"), output_dir)
    return results
