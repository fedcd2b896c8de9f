"""Train, select the best checkpoint on validation, test it: python scripts/train.py [overrides]."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from mnist_adder.cli import guarded, run_hydra_main


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    # Imported here, after Hydra has composed the config: a typo is told before torch and Lightning load.
    from mnist_adder.training.sweep import train_and_score

    # A sweeper (hparams_search=...) optimises what this returns: cfg.optimized_metric of the run.
    return guarded(train_and_score, cfg)


if __name__ == "__main__":
    run_hydra_main(main)
