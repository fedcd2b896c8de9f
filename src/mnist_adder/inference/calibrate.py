"""Temperature scaling: fitting both heads' temperatures on the validation split, behind training and
scripts/calibrate.py.

One temperature per head is fitted on the validation split (never the test set) by minimising the
negative log-likelihood (`fit_temperatures`, the one fitting step). Training runs it at its end and stores
the temperatures in the checkpoint it hands over (training/post_training.py, `calibrate: true`);
scripts/calibrate.py runs it on a checkpoint made without it and writes `<name>.calibrated.ckpt` beside it
(the user's file is never touched). The net divides its output logits by them (`DigitSumNet`), so eval,
predict, the demo and the ONNX/TorchScript export of a calibrated checkpoint give calibrated probabilities
with no code of their own; argmax predictions and the sum stay exactly as they were.

The "not a digit" detector is fitted in the same step and written into the same file (its statistics on
the training split, its threshold on the validation split: `mnist_adder.analysis.not_digit`).
"""

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from mnist_adder.analysis.calibration import collect_logits, fit_temperature, nll
from mnist_adder.analysis.not_digit import DEFAULT_ACCEPT, fit_not_digit_detector, format_not_digit
from mnist_adder.config_checks import check_config
from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import HOW_TO_GET_ONE, load_checkpoint, write_fitted_checkpoint
from mnist_adder.inference.evaluate import evaluation_trainer, run_datamodule
from mnist_adder.results import write_json_atomic
from mnist_adder.training.module import DigitSumModule

log = logging.getLogger(__name__)
HEADS = (("digit", "digit_logits", "label"), ("sum", "sum_logits", "sum_label"))
# The test metrics a temperature can change (probabilities, so the NLL losses and the ECEs); every other
# test metric counts argmax predictions, which dividing logits by a positive number keeps.
CHANGED_BY_TEMPERATURE = ("loss", "digit_loss", "sum_loss", "digit_ece", "sum_ece")


def calibrated_path(ckpt_path: str | Path) -> Path:
    """Where scripts/calibrate.py puts the calibrated copy of a checkpoint: `<name>.calibrated.ckpt`."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}.calibrated.ckpt")


def fit_temperatures(module: DigitSumModule, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """Fit each head's temperature on `datamodule`'s validation split and set both in `module`'s net.

    Returns, per head, the temperature and the validation NLL before and after, and under "fitted_on"
    the split it was fitted on. The logits are the net's at temperature 1 (a net that was calibrated
    before is refitted, not scaled twice), in eval mode. `datamodule` must not be attached to a trainer:
    alone it gives the whole validation split (one process of several would get only its share).
    """
    net = module.net
    was_training = net.training
    net.eval()  # no dropout: the logits the model gives when used
    net.set_temperatures(1.0, 1.0)
    datamodule.setup("fit")
    val = collect_logits(net, datamodule.val_dataloader())
    net.train(was_training)
    fitted: dict[str, Any] = {}
    for head, logits, labels in HEADS:
        temperature = fit_temperature(val[logits], val[labels])
        fitted[head] = {
            "temperature": temperature,
            "val_nll_before": nll(val[logits], val[labels]),
            "val_nll_after": nll(val[logits], val[labels], temperature),
        }
    net.set_temperatures(fitted["digit"]["temperature"], fitted["sum"]["temperature"])
    split_seed = getattr(datamodule, "split_seed", None)
    fitted["fitted_on"] = f"validation split ({len(val['label'])} images, data.split_seed={split_seed})"
    return fitted


def with_test_results(
    fitted: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    reliability: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`fitted` (from `fit_temperatures`) with each head's test ECE before and after calibration, from the
    test metrics of the model at temperature 1 (`before`) and at the fitted ones (`after`), and, given
    the module's `calibration_results` after each test (`reliability`), the reliability bins before and
    after. Warns if a test metric that temperature scaling cannot change did change."""
    for key, value in before.items():
        # Dividing logits by a positive number keeps every argmax: the accuracies must not move.
        # (Two logits that round to the same value after the division could tie; say so if it ever happens.)
        name = key.removeprefix("test/")
        if name not in CHANGED_BY_TEMPERATURE and key in after and after[key] != value:
            log.warning("calibration changed %s: %s -> %s (rounding ties)", key, value, after[key])
    summary = dict(fitted)
    for head, *_ in HEADS:
        summary[head] = fitted[head] | {
            "test_ece_before": float(before[f"test/{head}_ece"]),
            "test_ece_after": float(after[f"test/{head}_ece"]),
        }
        if reliability is not None:
            bins_before, bins_after = reliability
            summary[head]["test_reliability_before"] = bins_before[f"test/{head}_reliability"]
            summary[head]["test_reliability_after"] = bins_after[f"test/{head}_reliability"]
    return summary


def format_calibration(summary: dict[str, Any]) -> str:
    """The report for people: what the temperatures were fitted on, then per head its temperature, the
    validation NLL and the test ECE before and after."""
    header = f"{'head':<7}{'T':>8}{'val NLL before':>16}{'after':>9}{'test ECE before':>17}{'after':>9}"
    lines = [
        f"Temperatures fitted on the {summary['fitted_on']}; ECE on the MNIST test set (fixed pairs):",
        header,
        "-" * len(header),
    ]
    for head, *_ in HEADS:
        s = summary[head]
        lines.append(
            f"{head:<7}{s['temperature']:>8.4f}{s['val_nll_before']:>16.4f}{s['val_nll_after']:>9.4f}"
            f"{s['test_ece_before']:>17.4f}{s['test_ece_after']:>9.4f}"
        )
    return "\n".join(lines)


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    """Fit the temperatures of `cfg.ckpt_path` on validation (and the not-a-digit detector), write the
    calibrated checkpoint, and return (and write to `<output_dir>/calibration.json`) the temperatures and
    the NLL and ECE before and after, and what the detector was fitted on."""
    check_config(cfg)
    if not cfg.get("ckpt_path"):
        raise UserError(
            f"no checkpoint given: python scripts/calibrate.py ckpt_path=<file.ckpt>. {HOW_TO_GET_ONE}"
        )
    ckpt_path = Path(cfg.ckpt_path).resolve()
    output_dir = Path(cfg.paths.output_dir)
    module, run_config = load_checkpoint(ckpt_path)
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
    fitted = fit_temperatures(module, datamodule)
    after = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    summary = {"ckpt_path": str(ckpt_path), "calibrated_ckpt_path": str(target)}
    summary |= with_test_results(fitted, before, after, (bins_before, dict(module.calibration_results)))
    records: dict[str, Any] = {"calibration": {"source": str(ckpt_path), **fitted}}
    accept = cfg.get("not_digit_accept", DEFAULT_ACCEPT)
    if accept is not None:  # null: the temperatures alone
        not_digit = fit_not_digit_detector(
            module.net, datamodule.split_tensors("train"), datamodule.split_tensors("val"), accept
        )
        summary["not_digit"] = records["not_digit"] = not_digit
    write_fitted_checkpoint(ckpt_path, target, module, records)
    write_json_atomic(output_dir / "calibration.json", summary)
    log.info("%s", format_calibration(summary))
    if accept is not None:
        log.info("%s", format_not_digit(summary["not_digit"]))
    log.info("Calibrated checkpoint: %s", target)
    log.info("Run folder: %s", output_dir)
    return summary
