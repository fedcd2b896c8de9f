"""Corruptions of whole batches of MNIST images, for robustness tests: vectorised, seeded, in pixel space.

Every corruption works on pixels in 0..1 with a black (0) background, as MNIST is drawn, whatever the
normalisation: `corrupt` takes normalised images, undoes `normalize`, corrupts, clips to 0..1 and
normalises again, so "inverted" means light background and dark ink. Random choices (a direction, a
sign, the noise) are drawn per image from the generator given, so a batch is reproducible from a seed.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mnist_adder.data.augment import warp
from mnist_adder.data.mnist import IMAGE_SIZE, MNIST_MEAN, MNIST_STD, to_pixels

# pixels [N, 1, 28, 28] in 0..1, the corruption's level, a generator on the pixels' device -> pixels
CorruptionFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def _random_sign(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator, device=device).float() * 2 - 1


def _affine(
    pixels: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    tx: torch.Tensor,
    ty: torch.Tensor,
) -> torch.Tensor:
    """Resample through output->input maps [[a, b, tx], [c, d, ty]] (per image), background 0."""
    theta = torch.stack([torch.stack([a, b, tx], dim=1), torch.stack([c, d, ty], dim=1)], dim=1)
    return warp(pixels, theta.to(pixels.dtype), background=0.0)


def rotate(pixels: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by `degrees`, clockwise or counter-clockwise at random."""
    n, device = pixels.shape[0], pixels.device
    angle = _random_sign(n, generator, device) * math.radians(degrees)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(n, device=device)
    return _affine(pixels, cos, -sin, sin, cos, zero, zero)


def shift(pixels: torch.Tensor, distance: float, generator: torch.Generator) -> torch.Tensor:
    """Move each image by `distance` pixels in a random direction (ink that leaves the frame is lost)."""
    n, device = pixels.shape[0], pixels.device
    direction = torch.rand(n, generator=generator, device=device) * 2 * math.pi
    step = 2 * distance / IMAGE_SIZE  # one pixel is 2/28 in affine_grid's [-1, 1] coordinates
    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    return _affine(pixels, one, zero, zero, one, step * torch.cos(direction), step * torch.sin(direction))


def scale(pixels: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """Enlarge each image by `factor` or shrink it by 1/`factor`, at random, about the centre."""
    n, device = pixels.shape[0], pixels.device
    inverse_zoom = torch.float_power(torch.tensor(float(factor)), _random_sign(n, generator, device).cpu())
    inverse_zoom = inverse_zoom.float().to(device)
    zero = torch.zeros(n, device=device)
    return _affine(pixels, inverse_zoom, zero, zero, inverse_zoom, zero, zero)


def shear(pixels: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Slant each image horizontally: x moves by `amount` * y, leaning left or right at random."""
    n, device = pixels.shape[0], pixels.device
    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    return _affine(pixels, one, amount * _random_sign(n, generator, device), zero, one, zero, zero)


def gaussian_noise(pixels: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Add independent Gaussian noise of standard deviation `sigma` (in 0..1 pixel units) to every pixel."""
    noise = torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
    return pixels + sigma * noise


def blur(pixels: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur of standard deviation `sigma` pixels (separable, kernel out to 3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=pixels.device, dtype=pixels.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.pad(pixels, (radius, radius, 0, 0)), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(blurred, (0, 0, radius, radius)), kernel.view(1, 1, -1, 1))


def _pool_padding(size: int) -> tuple[int, int, int, int]:
    # size - 1 pixels of padding keep 28x28; an even window puts the extra one on the right and bottom.
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    return before, after, before, after


def thicken(pixels: torch.Tensor, size: float, generator: torch.Generator) -> torch.Tensor:
    """Thicker strokes: every pixel takes the brightest ink in its `size`x`size` window (max pooling)."""
    size = int(size)
    return F.max_pool2d(F.pad(pixels, _pool_padding(size)), size, stride=1)


def thin(pixels: torch.Tensor, size: float, generator: torch.Generator) -> torch.Tensor:
    """Thinner strokes: every pixel takes the faintest ink in its `size`x`size` window (min pooling)."""
    size = int(size)
    return -F.max_pool2d(F.pad(-pixels, _pool_padding(size)), size, stride=1)


def invert(pixels: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """Inverted contrast: (1 - share) * pixel + share * (1 - pixel). share=1 is the negative (black ink
    on white); 0.6 a faint negative (background 0.6, ink 0.4)."""
    return (1 - share) * pixels + share * (1 - pixels)


@dataclass(frozen=True)
class Corruption:
    fn: CorruptionFn
    levels: tuple[float, float, float]  # severities 1, 2, 3
    unit: str


# Three severities each, from mild to harsh for a digit drawn in a 20x20 box on 28x28.
CORRUPTIONS: dict[str, Corruption] = {
    "rotation": Corruption(rotate, (15.0, 30.0, 45.0), "degrees"),
    "shift": Corruption(shift, (2.0, 4.0, 6.0), "pixels"),
    "scale": Corruption(scale, (1.2, 1.4, 1.6), "zoom factor (in or out)"),
    "shear": Corruption(shear, (0.2, 0.4, 0.6), "x shift per y"),
    "gaussian_noise": Corruption(gaussian_noise, (0.1, 0.3, 0.5), "sigma (pixels 0..1)"),
    "blur": Corruption(blur, (0.75, 1.25, 1.75), "sigma (pixels)"),
    "thicken": Corruption(thicken, (2.0, 3.0, 4.0), "max-pool window"),
    "thin": Corruption(thin, (2.0, 3.0, 4.0), "min-pool window"),
    "invert": Corruption(invert, (0.6, 0.8, 1.0), "inverted share"),
}


def from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in 0..1 normalised as `normalize` does."""
    return (pixels - MNIST_MEAN) / MNIST_STD


def corrupt(images: torch.Tensor, fn: CorruptionFn, level: float, generator: torch.Generator) -> torch.Tensor:
    """Normalised images [N, 1, 28, 28] corrupted in pixel space by `fn` at `level`, normalised again."""
    return from_pixels(fn(to_pixels(images.float()), level, generator).clamp(0, 1)).to(images.dtype)
