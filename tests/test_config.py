"""Every choice of every config group composes, and the models instantiate from their configs."""

from pathlib import Path

import hydra
import pytest
import torch

from mnist_adder.training.module import DigitSumModule

from conftest import CONF_DIR

GROUPS = ["data", "model", "model/adder", "model/backbone", "trainer", "callbacks", "logger", "experiment"]


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def image_number_models() -> list[str]:
    """The model choices of the (image, number) task: all but model=addition, MNIST addition's, which
    data=mnist_addition chooses (tests/test_mnist_addition.py)."""
    return [model for model in choices("model") if model != "addition"]


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)], ids=lambda x: str(x))
def test_every_choice_composes(make_cfg, group, choice):
    cfg = make_cfg([f"{group}={choice}"])
    assert cfg.data.data_dir and cfg.trainer._target_ == "pytorch_lightning.Trainer"


@pytest.mark.parametrize("model", image_number_models())
def test_every_model_instantiates_and_runs(make_cfg, model):
    module = hydra.utils.instantiate(make_cfg([f"model={model}"]).model)
    assert isinstance(module, DigitSumModule)
    digit_logits, sum_logits = module(torch.randn(3, 1, 28, 28), torch.eye(10)[:3])
    assert digit_logits.shape == (3, 10) and sum_logits.shape == (3, 19)


def test_seed_model_config_is_the_seed_network(make_cfg):
    module = hydra.utils.instantiate(make_cfg(["model=seed"]).model)
    assert sum(p.numel() for p in module.net.parameters()) == 21_843
    assert module.net.adder_input == "logits"


def test_overrides_reach_their_targets(make_cfg, tmp_path: Path):
    cfg = make_cfg(
        [
            "trainer.max_epochs=3",
            "data.batch_size=64",
            "seed=0",
            "model.optimizer.lr=0.01",
            "trainer.fast_dev_run=true",
        ]
    )
    assert cfg.trainer.max_epochs == 3 and cfg.data.batch_size == 64 and cfg.data.seed == 0
    assert cfg.model.scheduler.max_lr == 0.01  # the schedule follows the learning rate
    module = hydra.utils.instantiate(cfg.model)
    optimizer = module.optimizer_factory(params=module.parameters())
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_data_dir_comes_from_the_environment(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    assert make_cfg().paths.data_dir == str(tmp_path)
    monkeypatch.delenv("DATA_DIR")
    assert make_cfg().paths.data_dir == str(CONF_DIR.parent / "data")
