"""Temperature scaling of a checkpoint, behind scripts/calibrate.py.

One temperature per head is fitted on the validation split (never the test set) by minimising the
negative log-likelihood, and written with the weights into `<name>.calibrated.ckpt` beside the checkpoint
(the user's file is never touched). The net divides its output logits by them (`DigitSumNet`), so eval,
predict, the demo and the ONNX/TorchScript export of the calibrated file give calibrated probabilities
with no code of their own; argmax predictions and the sum stay exactly as they were.

The "not a digit" detector is fitted in the same step and written into the same file (its statistics on
the training split, its threshold on the validation split: `mnist_adder.analysis.not_digit`).
"""

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mnist_adder.analysis.calibration import collect_logits, fit_temperature, nll
from mnist_adder.analysis.not_digit import DEFAULT_ACCEPT, fit_not_digit_detector
from mnist_adder.config_checks import check_config
from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import HOW_TO_GET_ONE, load_checkpoint
from mnist_adder.inference.evaluate import evaluation_trainer, run_datamodule
from mnist_adder.models.digit_sum import TEMPERATURES
from mnist_adder.models.not_digit import DETECTOR_BUFFERS
from mnist_adder.results import atomic_path, write_json_atomic

log = logging.getLogger(__name__)
HEADS = (("digit", "digit_logits", "label"), ("sum", "sum_logits", "sum_label"))


def calibrated_path(ckpt_path: str | Path) -> Path:
    """Where the calibrated copy of a checkpoint goes: `<name>.calibrated.ckpt` beside it."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}.calibrated.ckpt")


def format_calibration(summary: dict[str, Any]) -> str:
    """The table for people: per head, its temperature, validation NLL and test ECE before and after."""
    header = f"{'head':<7}{'T':>8}{'val NLL before':>16}{'after':>9}{'test ECE before':>17}{'after':>9}"
    lines = [header, "-" * len(header)]
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
    net = module.net
    net.set_temperatures(1.0, 1.0)  # fitted from the raw logits, also when given a calibrated checkpoint

    datamodule = run_datamodule(run_config, cfg)
    datamodule.setup("fit")
    val = collect_logits(net, datamodule.val_dataloader())
    temperatures = {head: fit_temperature(val[logits], val[labels]) for head, logits, labels in HEADS}

    trainer = evaluation_trainer(run_config.trainer, cfg, output_dir)
    before = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    net.set_temperatures(temperatures["digit"], temperatures["sum"])
    after = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    for key in ("test/digit_acc", "test/sum_acc"):
        # Dividing logits by a positive number keeps every argmax: the accuracies must not move.
        # (Two logits that round to the same value after the division could tie; say so if it ever happens.)
        if before[key] != after[key]:
            log.warning("calibration changed %s: %s -> %s (rounding ties)", key, before[key], after[key])

    summary: dict[str, Any] = {"ckpt_path": str(ckpt_path), "calibrated_ckpt_path": str(target)}
    for head, logits, labels in HEADS:
        summary[head] = {
            "temperature": temperatures[head],
            "val_nll_before": nll(val[logits], val[labels]),
            "val_nll_after": nll(val[logits], val[labels], temperatures[head]),
            "test_ece_before": float(before[f"test/{head}_ece"]),
            "test_ece_after": float(after[f"test/{head}_ece"]),
        }
    summary["fitted_on"] = (
        f"validation split ({len(val['label'])} images, data.split_seed={run_config.data.split_seed})"
    )
    summary["not_digit"] = fit_not_digit_detector(
        net,
        datamodule.split_tensors("train"),
        datamodule.split_tensors("val"),
        cfg.get("not_digit_accept", DEFAULT_ACCEPT),
    )

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = module.state_dict()
    names = [*TEMPERATURES, *(f"not_digit.{name}" for name in DETECTOR_BUFFERS)]
    for name in names:
        checkpoint["state_dict"][f"net.{name}"] = state[f"net.{name}"].clone()
    checkpoint["calibration"] = {"source": str(ckpt_path), **{head: summary[head] for head, *_ in HEADS}}
    checkpoint["calibration"]["not_digit"] = summary["not_digit"]
    with atomic_path(target) as tmp:  # whole or not at all, as the training checkpoints
        torch.save(checkpoint, tmp)
    write_json_atomic(output_dir / "calibration.json", summary)
    log.info(
        "Temperatures fitted on the %s; ECE on the MNIST test set (fixed pairs):\n%s",
        summary["fitted_on"],
        format_calibration(summary),
    )
    log.info(
        "Not a digit: threshold %.4f accepts %.1f %% of the %s; fitted on %s.",
        summary["not_digit"]["threshold"],
        100 * summary["not_digit"]["validation_accepted"],
        summary["not_digit"]["threshold_set_on"],
        summary["not_digit"]["fitted_on"],
    )
    log.info("Calibrated checkpoint: %s", target)
    log.info("Run folder: %s", output_dir)
    return summary
