import torch

from mnist_adder.data.augment import BACKGROUND, RandomAffine
from mnist_adder.data.mnist import normalize


def digit_like(n: int = 8) -> torch.Tensor:
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 8:20, 12:16] = 255
    return normalize(images).unsqueeze(1)


def test_zero_transform_is_the_identity():
    images = digit_like()
    out = RandomAffine(degrees=0, translate=0, scale=0)(images, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images, atol=1e-5)


def test_transform_moves_ink_but_keeps_the_background_black():
    images = digit_like()
    out = RandomAffine(degrees=15, translate=0.1, scale=0.1)(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert not torch.allclose(out, images)
    assert torch.allclose(out[:, :, 0, :], torch.full_like(out[:, :, 0, :], BACKGROUND), atol=1e-5)
    # each image gets its own transform
    assert not torch.allclose(out[0], out[1])


def test_same_generator_seed_same_batch():
    images, augment = digit_like(), RandomAffine()
    first = augment(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(6)))
