"""Temperature scaling: one temperature per head, fitted on the validation split (never the test set).

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides a head's logits
by one number T fitted to minimise the negative log-likelihood on held-out data: T > 1 softens
over-confident probabilities, and no argmax changes. The net divides its output logits by the stored
temperatures (`DigitSumNet`), so eval, predict, the demo and the exports of a calibrated checkpoint give
calibrated probabilities with no code of their own.
"""

import logging
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from mnist_adder.data.batches import Batch
from mnist_adder.models.digit_sum import DigitSumNet

log = logging.getLogger(__name__)

# log T is fitted inside these bounds (T from 0.02 to 50): a head that is never wrong on the fitting data
# would otherwise drive T to 0, and these already turn any logit gap into certainty or a near-uniform guess.
LOG_T_BOUND = 4.0


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


HEADS = (("digit", "digit_logits", "label"), ("sum", "sum_logits", "sum_label"))
# The test metrics a temperature can change (probabilities, so the NLL losses and the ECEs); every other
# test metric counts argmax predictions, which dividing logits by a positive number keeps.
CHANGED_BY_TEMPERATURE = ("loss", "digit_loss", "sum_loss", "digit_ece", "sum_ece")


def fit_temperatures(net: DigitSumNet, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """Fit each head's temperature on `datamodule`'s validation split and set both in `net`.

    Returns, per head, the temperature and the validation NLL before and after, and under "fitted_on"
    the split it was fitted on. The logits are the net's at temperature 1 (a net that was calibrated
    before is refitted, not scaled twice), in eval mode. `datamodule` must not be attached to a trainer:
    alone it gives the whole validation split (one process of several would get only its share).
    """
    was_training = net.training
    net.eval()  # no dropout: the logits the model gives when used
    net.set_temperatures(1.0, 1.0)
    datamodule.setup("fit")
    val = collect_logits(net, datamodule.val_dataloader())
    net.train(was_training)
    fitted: dict[str, Any] = {}
    for head, logits, labels in HEADS:
        temperature = fit_temperature(val[logits], val[labels])
        fitted[head] = {
            "temperature": temperature,
            "val_nll_before": nll(val[logits], val[labels]),
            "val_nll_after": nll(val[logits], val[labels], temperature),
        }
    net.set_temperatures(fitted["digit"]["temperature"], fitted["sum"]["temperature"])
    split_seed = getattr(datamodule, "split_seed", None)
    fitted["fitted_on"] = f"validation split ({len(val['label'])} images, data.split_seed={split_seed})"
    return fitted


def with_test_results(
    fitted: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    reliability: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`fitted` (from `fit_temperatures`) with each head's test ECE before and after calibration, from the
    test metrics of the model at temperature 1 (`before`) and at the fitted ones (`after`), and, given
    the module's `calibration_results` after each test (`reliability`), the reliability bins before and
    after. Warns if a test metric that temperature scaling cannot change did change."""
    for key, value in before.items():
        # Dividing logits by a positive number keeps every argmax: the accuracies must not move.
        # (Two logits that round to the same value after the division could tie; say so if it ever happens.)
        name = key.removeprefix("test/")
        if name not in CHANGED_BY_TEMPERATURE and key in after and after[key] != value:
            log.warning("calibration changed %s: %s -> %s (rounding ties)", key, value, after[key])
    summary = dict(fitted)
    for head, *_ in HEADS:
        summary[head] = fitted[head] | {
            "test_ece_before": float(before[f"test/{head}_ece"]),
            "test_ece_after": float(after[f"test/{head}_ece"]),
        }
        if reliability is not None:
            bins_before, bins_after = reliability
            summary[head]["test_reliability_before"] = bins_before[f"test/{head}_reliability"]
            summary[head]["test_reliability_after"] = bins_after[f"test/{head}_reliability"]
    return summary


def format_calibration(summary: dict[str, Any]) -> str:
    """The report for people: what the temperatures were fitted on, then per head its temperature, the
    validation NLL and the test ECE before and after."""
    header = f"{'head':<7}{'T':>8}{'val NLL before':>16}{'after':>9}{'test ECE before':>17}{'after':>9}"
    lines = [
        f"Temperatures fitted on the {summary['fitted_on']}; ECE on the MNIST test set (fixed pairs):",
        header,
        "-" * len(header),
    ]
    for head, *_ in HEADS:
        s = summary[head]
        lines.append(
            f"{head:<7}{s['temperature']:>8.4f}{s['val_nll_before']:>16.4f}{s['val_nll_after']:>9.4f}"
            f"{s['test_ece_before']:>17.4f}{s['test_ece_after']:>9.4f}"
        )
    return "\n".join(lines)
