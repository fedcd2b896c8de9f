"""Training throughput, project path vs bare PyTorch loop: python scripts/benchmark.py [format=json]."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from mnist_adder.cli import guarded, run_hydra_main


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Imported here, after Hydra has composed the config: a typo is told before torch and Lightning load.
    from mnist_adder.tools.benchmark import benchmark

    guarded(benchmark, cfg)


if __name__ == "__main__":
    run_hydra_main(main)
