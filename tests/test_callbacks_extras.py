"""callbacks=[default,early_stopping], callbacks=[default,rich], and the config tree (extras.print_config)."""

import hydra
import pytest
import torch
from pytorch_lightning.callbacks import EarlyStopping, RichModelSummary, RichProgressBar

from mnist_adder.config_checks import config_problems
from mnist_adder.training.train import instantiate_group, train

from conftest import compose_config, tiny_train_overrides


def test_early_stopping_is_off_by_default_and_watches_val_both_acc(tmp_path):
    assert "early_stopping" not in compose_config([], tmp_path).callbacks
    cfg = compose_config(["callbacks=[default,early_stopping]"], tmp_path)
    (stopper,) = [cb for cb in instantiate_group(cfg.callbacks) if isinstance(cb, EarlyStopping)]
    assert (stopper.monitor, stopper.mode) == ("val/both_acc", "max")
    assert "model_checkpoint" in cfg.callbacks  # added to the default callbacks, not instead of them


def test_rich_choice_puts_richs_bar_and_summary_on_the_trainer(tmp_path):
    cfg = compose_config(["callbacks=[default,rich]"], tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_group(cfg.callbacks), logger=False)
    assert isinstance(trainer.progress_bar_callback, RichProgressBar)
    assert any(isinstance(cb, RichModelSummary) for cb in trainer.callbacks)


def test_rich_bar_with_the_bar_turned_off_is_a_config_error(tmp_path):
    cfg = compose_config(["callbacks=[default,rich]", "trainer=debug"], tmp_path)
    (problem,) = config_problems(cfg)
    assert "trainer.enable_progress_bar=true" in problem


@pytest.mark.slow
def test_early_stopping_stops_a_run_that_stops_improving(tmp_path, tiny_mnist, capsys):
    overrides = [
        *tiny_train_overrides(tiny_mnist),
        "trainer.max_epochs=6",
        "trainer.enable_progress_bar=true",
        "callbacks=[default,early_stopping,rich]",
        # No gain counts as a gain of 1.0: after the first validation nothing improves, so with
        # patience 1 the run stops after its second epoch instead of its sixth.
        "callbacks.early_stopping.min_delta=1.0",
        "callbacks.early_stopping.patience=1",
    ]
    train(compose_config(overrides, tmp_path / "run"))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1
    out = capsys.readouterr().out
    # The config tree, printed first (on by default), with the callbacks as run.
    assert "CONFIG" in out and "early_stopping:" in out and "min_delta: 1.0" in out
    assert "Trainable params" in out  # rich's model summary


@pytest.mark.parametrize("print_config", [True, False])
def test_one_flag_turns_the_config_tree_off(tmp_path, tiny_mnist, capsys, print_config):
    overrides = [*tiny_train_overrides(tiny_mnist), "trainer.fast_dev_run=true"]
    train(compose_config([*overrides, f"extras.print_config={print_config}"], tmp_path / "run"))
    out = capsys.readouterr().out
    assert ("CONFIG" in out and "val_size: 50" in out) is print_config
