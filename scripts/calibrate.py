"""Fit one temperature per head on validation: python scripts/calibrate.py ckpt_path=<file.ckpt>."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from mnist_adder.cli import guarded, run_hydra_main
from mnist_adder.config_checks import check_config


@hydra.main(config_path="../conf", config_name="calibrate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Checked, then imported: a typo or a bad value is told before torch and Lightning load (seconds).
    guarded(check_config, cfg)
    from mnist_adder.inference.calibrate import calibrate

    guarded(calibrate, cfg)


if __name__ == "__main__":
    run_hydra_main(main)
