"""Test a checkpoint on the MNIST test set: python scripts/eval.py ckpt_path=<file.ckpt> [overrides]."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from mnist_adder.cli import guarded, run_hydra_main
from mnist_adder.config_checks import check_config


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Checked, then imported: a typo or a bad value is told before torch and Lightning load (seconds).
    guarded(check_config, cfg)
    from mnist_adder.evaluation.evaluate import evaluate

    guarded(evaluate, cfg)


if __name__ == "__main__":
    run_hydra_main(main)
