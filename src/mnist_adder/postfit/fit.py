"""What is fitted on trained weights, by training (before its final test) and scripts/calibrate.py alike.

The temperatures (`calibrate`, `mnist_adder.postfit.temperature`) and the "not a digit" detector
(`not_digit_accept`, `mnist_adder.postfit.not_digit`). Whatever else is fitted on trained weights belongs
here too: it sets what it fits in the net (as buffers, so that it travels in checkpoints and exports) and
returns a record of it by name, stored in the checkpoint under that name (`mnist_adder.postfit.store`).
"""

from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from mnist_adder.cli import build
from mnist_adder.models.digit_sum import DigitSumNet
from mnist_adder.postfit.not_digit import DEFAULT_ACCEPT, DEFAULT_FIT, DetectorFit, fit_not_digit_detector
from mnist_adder.postfit.temperature import fit_temperatures


def fit_post_training(
    net: DigitSumNet,
    datamodule: pl.LightningDataModule,
    calibrate: bool = True,
    accept: float | None = DEFAULT_ACCEPT,
    detector: DetectorFit = DEFAULT_FIT,
) -> dict[str, Any]:
    """Fit everything that is fitted on the trained weights of `net` and set it there; return a record of
    each fitted thing by name (empty when nothing is to be fitted), e.g. {"calibration": {...}}.

    `calibrate`: fit the temperatures; `accept`: the share of validation digits the detector's threshold
    accepts (None: no detector); `detector`: how it is fitted. `datamodule`: the run's data, not attached
    to a trainer (the whole splits, in every process).
    """
    fitted: dict[str, Any] = {}
    if calibrate:
        fitted["calibration"] = fit_temperatures(net, datamodule)  # sets up the datamodule's splits
    if accept is not None:
        datamodule.setup("fit")  # the splits, where the temperatures did not set them up (calibrate=false)
        # The "not a digit" detector: statistics on the training split, threshold on validation digits.
        fitted["not_digit"] = fit_not_digit_detector(
            net, datamodule.split_tensors("train"), datamodule.split_tensors("val"), accept, detector
        )
    return fitted


def detector_fit(cfg: DictConfig) -> DetectorFit:
    """The `detector` group of `cfg`, built (a refused value is one line, as every config object's); the
    defaults where `cfg` has none."""
    node = cfg.get("detector")
    return build(node, "detector") if node is not None else DetectorFit()
