"""The datamodule contract, on tiny IDX files written by the tests."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_adder.data import MNIST_MEAN, MNIST_STD, MnistSumDataModule, load_mnist
from mnist_adder.data.batches import TrainBatches
from mnist_adder.errors import UserError

from conftest import make_dm


def all_batches(loader):
    return [torch.cat(parts) for parts in zip(*list(loader), strict=True)]


def test_batches_have_the_contracted_shapes_and_dtypes(tiny_mnist):
    dm = make_dm(tiny_mnist)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        image, number_onehot, label, sum_onehot = next(iter(loader))
        b = label.shape[0]
        assert image.shape == (b, 1, 28, 28) and image.dtype == torch.float32
        assert number_onehot.shape == (b, 10) and number_onehot.dtype == torch.float32
        assert label.shape == (b,) and label.dtype == torch.int64
        assert sum_onehot.shape == (b, 19) and sum_onehot.dtype == torch.float32


def test_one_hots_are_valid_and_the_sum_is_label_plus_number(tiny_mnist):
    dm = make_dm(tiny_mnist)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        _, number_onehot, label, sum_onehot = all_batches(loader)
        for onehot in (number_onehot, sum_onehot):
            assert set(onehot.unique().tolist()) == {0.0, 1.0}
            assert torch.all(onehot.sum(dim=1) == 1)
        assert torch.equal(sum_onehot.argmax(1), label + number_onehot.argmax(1))


def test_images_are_normalised_with_the_mnist_mean_and_std(tiny_mnist):
    dm = make_dm(tiny_mnist)
    raw, _ = load_mnist(tiny_mnist, train=False)
    image = all_batches(dm.test_dataloader())[0]
    assert torch.allclose(image[:, 0], (raw.float() / 255 - MNIST_MEAN) / MNIST_STD)


def test_every_number_0_to_9_occurs_uniformly(tiny_mnist):
    dm = make_dm(tiny_mnist)
    numbers = torch.cat([all_batches(dm.train_dataloader())[1].argmax(1) for _ in range(10)])
    counts = torch.bincount(numbers, minlength=10)
    assert counts.min() > 0 and counts.shape == (10,)
    # 3,400 draws: each count is within 25% of the mean for a uniform 0..9 (an off-by-one would give a 0).
    assert (counts.float() / counts.float().mean() - 1).abs().max() < 0.25


def test_test_and_val_pairs_are_fixed_across_instantiations_and_seeds(tiny_mnist):
    a, b = make_dm(tiny_mnist, seed=1), make_dm(tiny_mnist, seed=2)
    for loader_a, loader_b in [
        (a.test_dataloader(), b.test_dataloader()),
        (a.val_dataloader(), b.val_dataloader()),
    ]:
        for x, y in zip(all_batches(loader_a), all_batches(loader_b), strict=True):
            assert torch.equal(x, y)
    # and the same object yields the same pairs on every pass
    test = a.test_dataloader()
    assert torch.equal(all_batches(test)[1], all_batches(test)[1])


def test_training_pairs_are_fresh_each_epoch_and_reproducible(tiny_mnist):
    dm = make_dm(tiny_mnist)
    loader = dm.train_dataloader()
    epoch0, epoch1 = all_batches(loader), all_batches(loader)
    assert not torch.equal(epoch0[1], epoch1[1])
    again = all_batches(make_dm(tiny_mnist).train_dataloader())  # same seed, epoch 0
    assert all(torch.equal(x, y) for x, y in zip(epoch0, again, strict=True))


def test_numbers_can_be_kept_fixed_across_epochs(tiny_mnist):
    loader = make_dm(tiny_mnist, resample_numbers=False).train_dataloader()
    order0, numbers0 = loader.epoch_order(0)
    order1, numbers1 = loader.epoch_order(1)
    assert torch.equal(numbers0, numbers1) and not torch.equal(order0, order1)


def test_validation_split_is_disjoint_from_training(tiny_mnist):
    dm = make_dm(tiny_mnist)
    train_images, _ = dm._splits["train"]
    val_images, _ = dm._splits["val"]
    assert len(train_images) + len(val_images) == 400 and len(val_images) == 60
    flat_train = {tuple(x.flatten()[:200].tolist()) for x in train_images}
    assert not any(tuple(x.flatten()[:200].tolist()) in flat_train for x in val_images)


def test_ddp_ranks_split_the_data_without_overlap(tiny_mnist):
    dm = make_dm(tiny_mnist)
    images, labels = dm._splits["train"]
    shards = [
        TrainBatches(images, labels, 16, seed=0, rank=r, world_size=2).epoch_order(0)[0] for r in (0, 1)
    ]
    assert len(set(shards[0].tolist()) & set(shards[1].tolist())) == 0


def test_missing_files_give_a_clear_error(tmp_path):
    with pytest.raises(UserError) as err:
        MnistSumDataModule(data_dir=tmp_path / "empty", download=False).prepare_data()
    message = str(err.value)
    for needed in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", str(tmp_path / "empty"), "DATA_DIR"):
        assert needed in message


@pytest.mark.slow
def test_missing_data_stops_the_cli_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            f"paths.data_dir={tmp_path}",
            "data.download=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "train-images-idx3-ubyte" in result.stderr and "DATA_DIR" in result.stderr


def test_augmentation_changes_training_images_only_and_is_reproducible(tiny_mnist):
    from mnist_adder.data.augment import RandomAffine

    plain = make_dm(tiny_mnist)
    augmented = make_dm(tiny_mnist, augment=RandomAffine())
    plain_batch, augmented_batch = (
        next(iter(plain.train_dataloader())),
        next(iter(augmented.train_dataloader())),
    )
    assert not torch.equal(plain_batch[0], augmented_batch[0])
    for same in (1, 2, 3):  # number, label and sum are untouched
        assert torch.equal(plain_batch[same], augmented_batch[same])
    again = next(iter(make_dm(tiny_mnist, augment=RandomAffine()).train_dataloader()))
    assert torch.equal(again[0], augmented_batch[0])
    assert torch.equal(all_batches(plain.test_dataloader())[0], all_batches(augmented.test_dataloader())[0])
