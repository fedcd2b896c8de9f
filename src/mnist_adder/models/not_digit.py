"""A "not a digit" score for every image: how much nearer it lies to things that are not digits than to
the nearest digit class, in the backbone's feature space.

The features of an image (`detector_features`) are what its backbone computes on the way to the digit
logits: the input of the last layer, and the mean and standard deviation of every channel of each earlier
conv block (the "feature ensemble" of Lee et al. 2018). In that space each digit class is a Gaussian
(class mean, one covariance shared by all classes: the Mahalanobis detector of Lee et al. 2018, "A Simple
Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks"), and so is each group
of synthetic not-digits (each kind of noise, scribbles, each shape, each letter: outlier exposure,
Hendrycks et al. 2019, "Deep Anomaly Detection with Outlier Exposure"). The score is

    min over digit classes c of M(x, mu_c)  -  min over not-digit groups k of M(x, nu_k),

M the squared Mahalanobis distance under the shared covariance: the log-likelihood ratio of the nearest
not-digit Gaussian against the nearest digit Gaussian (linear discriminant analysis). The quadratic term
x' P x is the same in both distances and cancels, so each Gaussian k is stored as one linear function
`bias_k + weight_k . x` (weight_k = -2 P mu_k, bias_k = mu_k' P mu_k): small buffers, exact, and the same
in ONNX and TorchScript. They are float64, and so is the score: the two minima are large numbers (about
10^4) whose difference is the score, which float32 would get wrong by about 0.03, enough for the same image
to score differently alone and in a batch. An image is "not a digit" when its score is above `threshold`,
set so that a stated share of real validation digits is accepted (`mnist_adder.analysis.not_digit`).

The buffers are empty until fitted: a net without them (every checkpoint from before this existed)
has no detector and refuses nothing.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

NUM_DIGIT_CLASSES = 10
DETECTOR_BUFFERS = ("weight", "bias", "threshold")


def detector_features(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, F] from a backbone's `features_and_logits` features: every feature map [B, C, H, W] becomes its
    channels' means and standard deviations over the image, a flat [B, D] is kept as it is."""
    parts: list[torch.Tensor] = []
    for feature in features:
        if feature.dim() == 4:
            parts += [feature.mean(dim=(2, 3)), feature.var(dim=(2, 3), correction=0).sqrt()]
        else:
            parts.append(feature.flatten(1))
    return torch.cat(parts, dim=1).double()


class NotDigitDetector(nn.Module):
    """The score and the threshold, as buffers: they travel in checkpoints and exports with the weights.

    weight [K, F], bias [K]: one linear function per Gaussian, the first `NUM_DIGIT_CLASSES` the digit
    classes, the others the groups of not-digits. threshold []: above it, not a digit.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    threshold: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(0, dtype=torch.float64))
        # 0, not NaN, while unfitted: a NaN buffer is never equal to itself, and checkpoints are compared.
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        """Whether the detector holds a score (False for a fresh net and for older checkpoints)."""
        return self.weight.shape[0] > NUM_DIGIT_CLASSES

    def set(self, weight: torch.Tensor, bias: torch.Tensor, threshold: float) -> None:
        """Store a fitted score: `weight` [K, F] and `bias` [K] (digit classes first), and its threshold."""
        if weight.dim() != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] <= NUM_DIGIT_CLASSES:
            raise ValueError(
                f"weight [K, F] and bias [K] with K > {NUM_DIGIT_CLASSES} expected, "
                f"not {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        device = self.threshold.device
        self.weight = weight.detach().to(device, torch.float64).clone()
        self.bias = bias.detach().to(device, torch.float64).clone()
        self.set_threshold(threshold)

    def set_threshold(self, threshold: float) -> None:
        if not torch.isfinite(torch.tensor(float(threshold))):
            raise ValueError(f"the threshold must be a finite number, not {threshold}")
        self.threshold = torch.tensor(float(threshold), dtype=torch.float64, device=self.threshold.device)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """The not-a-digit score [B] (float64) of `detector_features` [B, F]: higher is less like a digit;
        NaN before the detector is fitted."""
        if not self.fitted:
            return torch.full((len(features),), float("nan"), dtype=torch.float64, device=features.device)
        half_distances = features.double() @ self.weight.T + self.bias  # [B, K], less the common x' P x
        digit = half_distances[:, :NUM_DIGIT_CLASSES].min(dim=1).values
        other = half_distances[:, NUM_DIGIT_CLASSES:].min(dim=1).values
        return digit - other

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A fitted detector's buffers have the shapes of its backbone's features; a fresh one's are empty,
        # so they take the stored shapes. A checkpoint without them loads as "no detector", as the
        # temperatures default to 1.
        for name in DETECTOR_BUFFERS:
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
            else:
                state_dict[key] = getattr(NotDigitDetector(), name)
                setattr(self, name, state_dict[key].clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
