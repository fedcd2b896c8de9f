"""scripts/calibrate.py: fit what training fits after `fit` (`mnist_adder.postfit.fit`: the temperatures
and the "not a digit" detector) on a checkpoint made without it, and write `<name>.calibrated.ckpt` beside
it (the user's file is never touched), with calibration.json in the run folder.
"""

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import evaluation_trainer, load_given_checkpoint, run_datamodule
from mnist_adder.postfit.fit import detector_fit, fit_post_training
from mnist_adder.postfit.not_digit import DEFAULT_ACCEPT, format_not_digit
from mnist_adder.postfit.store import write_fitted_checkpoint
from mnist_adder.postfit.temperature import format_calibration, with_test_results
from mnist_adder.results import write_json_atomic

log = logging.getLogger(__name__)


def calibrated_path(ckpt_path: str | Path) -> Path:
    """Where scripts/calibrate.py puts the calibrated copy of a checkpoint: `<name>.calibrated.ckpt`."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}.calibrated.ckpt")


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    """Fit the temperatures of `cfg.ckpt_path` on validation (and the not-a-digit detector), write the
    calibrated checkpoint, and return (and write to `<output_dir>/calibration.json`) the temperatures and
    the NLL and ECE before and after, and what the detector was fitted on."""
    # Temperatures and the "not a digit" detector: the (image, number) task's net has them.
    ckpt_path, module, run_config = load_given_checkpoint(cfg, "calibrate", tasks=("digit_sum",))
    output_dir = Path(cfg.paths.output_dir)
    target = calibrated_path(ckpt_path)
    if not os.access(target.parent, os.W_OK):
        raise UserError(
            f"cannot write {target}: its folder is not writable. Copy the checkpoint somewhere you can write."
        )

    datamodule = run_datamodule(run_config, cfg)
    trainer = evaluation_trainer(run_config.trainer, cfg, output_dir)
    module.net.set_temperatures(1.0, 1.0)  # the raw model, also when given a calibrated checkpoint
    before = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    bins_before = dict(module.calibration_results)  # the reliability diagrams' bins, for the results page
    accept = cfg.get("not_digit_accept", DEFAULT_ACCEPT)
    fitted = fit_post_training(module.net, datamodule, True, accept, detector_fit(cfg))
    after = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    summary = {"ckpt_path": str(ckpt_path), "calibrated_ckpt_path": str(target)}
    reliability = (bins_before, dict(module.calibration_results))
    summary |= with_test_results(fitted["calibration"], before, after, reliability)
    records: dict[str, Any] = {"calibration": {"source": str(ckpt_path), **fitted["calibration"]}}
    if "not_digit" in fitted:  # not_digit_accept=null: the temperatures alone
        summary["not_digit"] = records["not_digit"] = fitted["not_digit"]
    write_fitted_checkpoint(ckpt_path, target, module, records)
    write_json_atomic(output_dir / "calibration.json", summary)
    log.info("%s", format_calibration(summary))
    if "not_digit" in summary:
        log.info("%s", format_not_digit(summary["not_digit"]))
    log.info("Calibrated checkpoint: %s", target)
    log.info("Run folder: %s", output_dir)
    return summary
