"""TensorBoard beyond scalars, read back with its own reader: images, per-class accuracies, hparams."""

import io

import hydra
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from mnist_adder.render import confusion_matrix_figure, misclassified_grid
from mnist_adder.training.tensorboard_images import ValidationImages

IMAGE_TAGS = ("val/digit_confusion", "val/sum_confusion", "val/misclassified")


@pytest.mark.slow
def test_training_run_logs_images_per_class_accuracies_and_hparams(trained_run):
    events = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    for tag in IMAGE_TAGS:
        logged = events.Images(tag)
        assert len(logged) == 2, tag  # one per epoch (the sanity check logs none)
        picture = Image.open(io.BytesIO(logged[-1].encoded_image_string))
        assert picture.mode == "RGB" and picture.width > 300 and picture.height > 100
    assert events.Images("val/digit_confusion")[0].step < events.Images("val/digit_confusion")[1].step

    scalars = set(tags["scalars"])
    for stage in ("val", "test"):
        assert {f"{stage}/digit_acc_per_class/{c}" for c in range(10)} <= scalars
        assert {f"{stage}/sum_acc_per_class/{c}" for c in range(19)} <= scalars
    assert "val/sum_given_digit_acc" in scalars

    hparams = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert {"test/digit_acc", "test/sum_acc", "test/both_acc", "test/sum_given_digit_acc"} <= metric_tags
    assert not any("per_class" in tag for tag in metric_tags)  # lists stay out of the hparams tab
    assert {"model/net/backbone/_target_", "seed"} <= {info.name for info in experiment.hparam_infos}


def test_confusion_matrices_agree_with_the_per_class_accuracies(make_cfg, tiny_mnist, tmp_path):
    cfg = make_cfg([f"paths.data_dir={tiny_mnist}", "data.val_size=60", "data.eval_batch_size=25"])
    module = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    callback = ValidationImages(max_images=5)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="tb", version=""),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    for head in ("digit", "sum"):
        matrix = callback.matrices[head].double()
        assert matrix.sum() == 60
        per_class = matrix.diag() / matrix.sum(1).clamp(min=1)
        expected = torch.tensor(module.per_class_results[f"val/{head}_acc_per_class"], dtype=torch.float64)
        assert torch.allclose(per_class, expected, atol=1e-6)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert set(IMAGE_TAGS) <= set(events.Tags()["images"])


def test_confusion_matrix_figure_shows_counts_and_row_accuracies():
    matrix = torch.nn.functional.pad(torch.tensor([[5, 1], [0, 4]]), (0, 17, 0, 17))  # 19 sum classes
    figure = confusion_matrix_figure(matrix, "sum")
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert {"5", "1", "4"} <= set(texts) and "0" not in texts  # empty cells stay blank
    assert {"83.3", "100.0"} <= set(texts) and texts.count("-") == 17  # rows without samples
    assert [t.get_text() for t in figure.texts] == ["sum"]


def test_misclassified_grid_is_an_rgb_array():
    grid = misclassified_grid(torch.zeros(10, 1, 28, 28), [1] * 10, [2] * 10, [7] * 10, [9] * 10, columns=4)
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.dtype.name == "uint8"
    assert grid.shape[0] >= 3 * (84 + 34) and grid.shape[1] >= 4 * 84  # 3 rows of 4
