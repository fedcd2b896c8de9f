"""The training pipeline behind scripts/train.py: fit, select on validation, fit the temperatures on the
selected weights (training/post_training.py), test the checkpoint handed over."""

import inspect
import logging
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, Timer, WeightAveraging
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mnist_adder.analysis.not_digit import format_not_digit
from mnist_adder.cli import _in_multirun, build
from mnist_adder.config_checks import check_config, check_resume
from mnist_adder.errors import UserError
from mnist_adder.inference.calibrate import CHANGED_BY_TEMPERATURE, format_calibration, with_test_results
from mnist_adder.results import format_results, write_json_atomic
from mnist_adder.training.callbacks import FlushLoggers, NonFiniteLossGuard, RandomState
from mnist_adder.training.config_tree import print_config_tree
from mnist_adder.training.module import DigitSumModule
from mnist_adder.training.post_training import fit_post_training, load_weights, store_post_training
from mnist_adder.training.run_dir import claim_output_dir
from mnist_adder.training.scaleout import check_process_launch, lost_peers_stop_clearly

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


def _uncalibrated_test(
    trainer: pl.Trainer, module: DigitSumModule, datamodule: pl.LightningDataModule
) -> dict[str, float]:
    """The test metrics of the weights in `module` at temperature 1, for metrics.json's `*_uncalibrated`
    keys; the fitted temperatures are set back after. The loggers get only the test of the model handed
    over, so this one is kept from them."""
    temperatures = module.net.temperatures()
    module.net.set_temperatures(1.0, 1.0)
    loggers, trainer.loggers = trainer.loggers, []
    try:
        return trainer.test(module, datamodule=datamodule, verbose=False)[0]
    finally:
        trainer.loggers = loggers
        module.net.set_temperatures(*temperatures)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test as `cfg` says; return the results also written to `<output_dir>/metrics.json`."""
    check_config(cfg)  # every bad config value stops the run here, before anything is built
    check_resume(cfg)
    output_dir = claim_output_dir(Path(cfg.paths.output_dir), cfg.get("ckpt_path"), _in_multirun())
    if output_dir != Path(cfg.paths.output_dir).resolve():
        cfg.paths.output_dir = str(output_dir)  # resuming: continue in the checkpoint's own run folder
    if cfg.get("extras") and cfg.extras.get("print_config"):
        print_config_tree(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data, "data")
    datamodule.prepare_data()  # a missing dataset stops the run here, before anything is built
    module = build(cfg.model, "model")
    # The resolved config travels in every checkpoint, so a checkpoint alone can rebuild its model.
    module.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)}, logger=False)

    # Always on, whatever the callbacks group: exact resumes and a stop on a NaN/inf loss.
    callbacks = [
        *instantiate_group(cfg.get("callbacks"), "callbacks"),
        RandomState(),
        FlushLoggers(),
        NonFiniteLossGuard(),
    ]
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer: pl.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    check_process_launch(trainer)

    try:
        with lost_peers_stop_clearly(trainer, "training"):
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:
        # InterruptCheckpoint has saved last.ckpt and logged how to continue; exit as killed by SIGTERM.
        log.error("Training stopped by SIGTERM.")
        raise SystemExit(128 + signal.SIGTERM) from None
    timer = _find(trainer.callbacks, Timer)
    # Read now: testing a checkpoint reloads the Timer's state saved in it.
    fit_seconds = round(timer.time_elapsed("train"), 3) if timer is not None else None

    # The checkpoint that selects on validation; without one, the newest (last.ckpt) is tested.
    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    checkpoint = next((cb for cb in checkpoints if cb.monitor), checkpoints[0] if checkpoints else None)
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    # The selected checkpoint's "state_dict" holds the averaged weights where weight averaging is on; its
    # callback would load the raw ones ("current_model_state", kept for resuming) over them when the test
    # restores the checkpoint, so it sits the test out. Without a checkpoint, on_train_end has already
    # copied the average into the module.
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, WeightAveraging)]
    # fast_dev_run writes no checkpoint: the weights in memory are fitted, tested and not stored then.
    if best_path:
        load_weights(module, best_path)
    fitted = fit_post_training(module, build(cfg.data, "data"), cfg)
    uncalibrated, bins_uncalibrated = None, None
    if "calibration" in fitted:
        with lost_peers_stop_clearly(trainer, "testing"):
            uncalibrated = _uncalibrated_test(trainer, module, datamodule)
        bins_uncalibrated = dict(module.calibration_results)
    ckpt_path = best_path
    if best_path and fitted:
        ckpt_path = store_post_training(trainer, best_path, output_dir, module, fitted)
    # The test of the checkpoint handed over, read back from its file.
    with lost_peers_stop_clearly(trainer, "testing"):
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path or None, verbose=False)
    test_metrics = tested[0]

    results: dict[str, Any] = {name: float(value) for name, value in test_metrics.items()}
    if hasattr(module.net, "temperatures"):  # MNIST addition's net (data=mnist_addition) has none
        digit_temperature, sum_temperature = module.net.temperatures()
        results |= {"digit_temperature": digit_temperature, "sum_temperature": sum_temperature}
    calibration = None
    if uncalibrated is not None:
        calibration = {"ckpt_path": ckpt_path or None} | with_test_results(
            fitted["calibration"], uncalibrated, test_metrics, (bins_uncalibrated, module.calibration_results)
        )
        results |= {
            f"test/{name}_uncalibrated": float(uncalibrated[f"test/{name}"])
            for name in CHANGED_BY_TEMPERATURE
            if f"test/{name}" in uncalibrated
        }
    not_digit = fitted.get("not_digit")
    # Named after what selected it: best_val/both_acc by default, best_val/sum_acc in MNIST addition.
    best_key = (
        f"best_{checkpoint.monitor}" if checkpoint is not None and checkpoint.monitor else "best_val/both_acc"
    )
    results |= {
        "ckpt_path": ckpt_path or None,
        # Above it, an image is refused as not a digit (None: no detector, not_digit_accept=null).
        "not_digit_threshold": not_digit["threshold"] if not_digit else None,
        best_key: float(checkpoint.best_model_score)
        if checkpoint is not None and checkpoint.best_model_score is not None
        else None,
        "fit_seconds": fit_seconds,
        "num_parameters": sum(p.numel() for p in module.net.parameters()),
        "precision": str(trainer.precision),  # as run: trainer=auto decides it on the machine
        "model": _choice("model"),
        "seed": cfg.seed,
        "resumed_from": cfg.get("ckpt_path"),
    }
    # Lists of 10 and 19 per-class accuracies: in metrics.json, not in the hparams tab (scalars only).
    results |= {k: v for k, v in module.per_class_results.items() if k.startswith("test/")}
    if trainer.is_global_zero:
        test_scalars = {k: v for k, v in results.items() if k.startswith("test/") and isinstance(v, float)}
        for logger in trainer.loggers:
            _log_config(logger, module.hparams["config"], test_scalars)
        if calibration is not None:
            log.info("%s", format_calibration(calibration))
        if not_digit:
            log.info("%s", format_not_digit(not_digit))
        log.info("Results (MNIST test set, fixed pairs):\n%s", format_results(results))
        # The results, then the calibration summary scripts/calibrate.py also writes (the results page
        # draws its reliability diagrams from it); each whole or not at all.
        outputs = {"metrics.json": results, "calibration.json": calibration}
        for name, content in ((n, c) for n, c in outputs.items() if c is not None):
            try:
                write_json_atomic(output_dir / name, content)
            except OSError as err:
                raise UserError(
                    f"could not write {output_dir / name}: {err.strerror or err}; no partial file was "
                    "left (the results are in the log above). Free disk space or make the folder writable."
                ) from err
        log.info("Run folder: %s", output_dir)
    return results
