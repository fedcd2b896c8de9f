"""A "not a digit" score for every image: a small classifier on the backbone's features, trained to tell
real digits from synthetic not-digits.

The features of an image (`detector_features`) are what its backbone computes on the way to the digit
logits: the input of the last layer, and the mean and standard deviation of every channel of each earlier
conv block (the "feature ensemble" of Lee et al. 2018). On them, standardised by the digits' mean and
scale, one hidden ReLU layer and a linear output give the log-odds that the image is not a digit: outlier
exposure (Hendrycks et al. 2019, "Deep Anomaly Detection with Outlier Exposure") as a head of its own, fitted
on the frozen backbone against noise, scribbles, shapes and letters (`mnist_adder.postfit.not_digit`), so
the digit and sum heads stay as they were trained. An image is "not a digit" when its score is above
`threshold`, set so that a stated share of real validation digits is accepted.

The buffers and the score are float64: cheap at this size, and the exported outputs keep their types.
The buffers are empty until fitted: a net without them (a checkpoint from before the detector existed)
has no detector and refuses nothing.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DETECTOR_BUFFERS = (
    "mean",
    "scale",
    "hidden_weight",
    "hidden_bias",
    "output_weight",
    "output_bias",
    "threshold",
)


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


def layer_shapes(hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    """The shape of each of the detector's layers (its buffers but the threshold), for `hidden` units on
    `width` features."""
    return {
        "mean": (width,),
        "scale": (width,),
        "hidden_weight": (hidden, width),
        "hidden_bias": (hidden,),
        "output_weight": (hidden,),
        "output_bias": (),
    }


class NotDigitDetector(nn.Module):
    """The classifier and its threshold, as buffers: they travel in checkpoints and exports with the
    weights, and no optimiser of the net ever sees them.

    score(x) = output_weight . relu(hidden_weight @ ((x - mean) / scale) + hidden_bias) + output_bias,
    mean and scale [F], hidden_weight [H, F], hidden_bias [H], output_weight [H], output_bias []; above
    threshold [], not a digit.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    hidden_weight: torch.Tensor
    hidden_bias: torch.Tensor
    output_weight: torch.Tensor
    output_bias: torch.Tensor
    threshold: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        # Empty layers while unfitted; threshold 0, not NaN: a NaN buffer is never equal to itself, and
        # checkpoints are compared.
        for name, shape in {**layer_shapes(0, 0), "threshold": ()}.items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        """Whether the detector holds a score (False for a fresh net and for older checkpoints)."""
        return self.hidden_weight.numel() > 0

    def set(self, layers: dict[str, torch.Tensor], threshold: float) -> None:
        """Store a fitted classifier: `layers` maps each buffer name but `threshold` to its tensor."""
        hidden, width = layers["hidden_weight"].shape
        shapes = layer_shapes(hidden, width)
        wrong = {k: tuple(layers[k].shape) for k, shape in shapes.items() if tuple(layers[k].shape) != shape}
        if wrong or not hidden or not width:
            raise ValueError(f"the detector's layers should have the shapes {shapes}, not {wrong}")
        device = self.threshold.device
        for name in shapes:
            setattr(self, name, layers[name].detach().to(device, torch.float64).clone())
        self.set_threshold(threshold)

    def set_threshold(self, threshold: float) -> None:
        if not torch.isfinite(torch.tensor(float(threshold))):
            raise ValueError(f"the threshold must be a finite number, not {threshold}")
        self.threshold = torch.tensor(float(threshold), dtype=torch.float64, device=self.threshold.device)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """The not-a-digit score [B] (float64, log-odds) of `detector_features` [B, F]: higher is less like
        a digit; NaN before the detector is fitted."""
        if not self.fitted:
            # full_like, not full((len(features),)): an exported graph keeps its batch size free.
            return torch.full_like(features[:, 0], float("nan"), dtype=torch.float64)
        standardised = (features.double() - self.mean) / self.scale
        hidden = torch.relu(standardised @ self.hidden_weight.T + self.hidden_bias)
        return hidden @ self.output_weight + self.output_bias

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A fitted detector's buffers have the shapes of its features; a fresh one's are empty, so they
        # take the stored shapes. A checkpoint without them (from before the detector) loads as "no
        # detector", as the temperatures default to 1.
        for name in DETECTOR_BUFFERS:
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
            else:
                state_dict[key] = getattr(NotDigitDetector(), name)
                setattr(self, name, state_dict[key].clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
