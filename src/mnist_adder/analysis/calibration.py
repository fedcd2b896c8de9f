"""Are the probabilities honest: expected calibration error, reliability bins, temperature scaling.

A head is calibrated when, among the samples it gives a confidence (top probability) of about p, a share
p is right. The expected calibration error (ECE) sorts samples into 15 equal-width confidence bins and
averages |accuracy - mean confidence| over the bins, weighted by their share of samples (torchmetrics'
`MulticlassCalibrationError`, norm L1). Temperature scaling (Guo et al. 2017, "On Calibration of Modern
Neural Networks") divides a head's logits by one number T fitted to minimise the negative log-likelihood
on held-out data: T > 1 softens over-confident probabilities, and no argmax changes.
"""

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.utilities import dim_zero_cat

from mnist_adder.data.batches import Batch

ECE_BINS = 15
# log T is fitted inside these bounds (T from 0.02 to 50): a head that is never wrong on the fitting data
# would otherwise drive T to 0, and these already turn any logit gap into certainty or a near-uniform guess.
LOG_T_BOUND = 4.0


def calibration_error(num_classes: int, n_bins: int = ECE_BINS) -> MulticlassCalibrationError:
    """The ECE metric of one head: `n_bins` equal-width confidence bins, L1 (the ECE of Guo et al.)."""
    # validate_args=False: the argument checks would sync the device on every batch.
    return MulticlassCalibrationError(num_classes, n_bins=n_bins, norm="l1", validate_args=False)


def reliability_bins(
    confidences: torch.Tensor | Sequence[torch.Tensor],
    accuracies: torch.Tensor | Sequence[torch.Tensor],
    n_bins: int = ECE_BINS,
) -> dict[str, list[float]]:
    """Per equal-width confidence bin: the number of samples, their mean confidence and their accuracy
    (0 for an empty bin). A confidence of exactly 1 falls into the last bin."""
    confidences = dim_zero_cat(confidences).detach().float().cpu()
    right = dim_zero_cat(accuracies).detach().float().cpu()
    index = (confidences * n_bins).long().clamp(0, n_bins - 1)
    count = torch.zeros(n_bins).index_add_(0, index, torch.ones_like(confidences))
    confidence_sum = torch.zeros(n_bins).index_add_(0, index, confidences)
    right_sum = torch.zeros(n_bins).index_add_(0, index, right)
    filled = count.clamp(min=1)
    return {
        "count": count.tolist(),
        "confidence": (confidence_sum / filled).tolist(),
        "accuracy": (right_sum / filled).tolist(),
    }


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """The ECE of one head from its logits [N, C] and the true classes [N], as the test metric computes it."""
    metric = calibration_error(logits.shape[-1], n_bins)
    metric.update(logits.float().softmax(dim=-1), labels)
    return float(metric.compute())


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / temperature)."""
    return float(F.cross_entropy(logits.float() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) on these samples.

    LBFGS on log T (Guo et al. 2017): log T keeps T positive and makes the search scale-free.
    """
    logits, labels = logits.detach().float(), labels.detach()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(-LOG_T_BOUND, LOG_T_BOUND).exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(-LOG_T_BOUND, LOG_T_BOUND).exp())


@torch.no_grad()  # not inference_mode: the logits are fitted with autograd afterwards
def collect_logits(net: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """The net's outputs and the true classes over `batches`: digit_logits, sum_logits, label, sum_label."""
    parts: dict[str, list[torch.Tensor]] = {
        name: [] for name in ("digit_logits", "sum_logits", "label", "sum_label")
    }
    device = next(net.parameters()).device  # the batches may live elsewhere (data.on_device)
    for image, number_onehot, label, sum_onehot in batches:
        digit_logits, sum_logits = net(image.to(device), number_onehot.to(device))
        parts["digit_logits"].append(digit_logits.float().cpu())
        parts["sum_logits"].append(sum_logits.float().cpu())
        parts["label"].append(label.cpu())
        parts["sum_label"].append(sum_onehot.argmax(dim=-1).cpu())
    return {name: torch.cat(values) for name, values in parts.items()}
