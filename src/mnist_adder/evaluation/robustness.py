"""How robust is a model: the test set (its fixed pairs) under every corruption at three severities.

Each (corruption, severity) is one pass of the Lightning test loop over the test batches with their images
corrupted on the fly (`mnist_adder.data.corruptions`), so its numbers come from the same metrics as the
clean test (`DigitSumModule`): digit, sum and both accuracy, and the calibration error of each head.
"""

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from mnist_adder.data.batches import Batch
from mnist_adder.data.corruptions import CORRUPTIONS, corrupt
from mnist_adder.training.module import DigitSumModule

log = logging.getLogger(__name__)
ROW_METRICS = ("digit_acc", "sum_acc", "both_acc", "digit_ece", "sum_ece")


class CorruptedBatches:
    """The batches of `batches` with their images corrupted (`corruption` None: as they are), cut after
    `limit` images if given; batch i draws its random numbers from (`seed`, i) alone."""

    def __init__(
        self, batches: Any, corruption: str | None, level: float, seed: int, limit: int | None = None
    ) -> None:
        self.batches, self.level, self.seed, self.limit = batches, level, seed, limit
        self.fn = CORRUPTIONS[corruption].fn if corruption is not None else None

    def __len__(self) -> int:
        if self.limit is None:
            return len(self.batches)
        return min(len(self.batches), -(-self.limit // self.batches.batch_size))

    def __iter__(self) -> Iterator[Batch]:
        seen = 0
        for i, batch in enumerate(self.batches):
            if self.limit is not None:
                if seen >= self.limit:
                    return
                batch = tuple(t[: self.limit - seen] for t in batch)
                seen += len(batch[0])
            image, number_onehot, label, sum_onehot = batch
            if self.fn is not None:
                generator = torch.Generator(device=image.device).manual_seed(self.seed * 1_000_003 + i)
                image = corrupt(image, self.fn, self.level, generator)
            yield image, number_onehot, label, sum_onehot


def corruption_seed(seed: int, corruption: str, severity: int) -> int:
    """One seed per (robustness seed, corruption, severity): every cell of the table draws its own numbers."""
    return (seed * 1_009 + list(CORRUPTIONS).index(corruption)) * 17 + severity


def evaluate_robustness(
    trainer: pl.Trainer,
    module: DigitSumModule,
    test_batches: Any,
    seed: int = 0,
    levels: Mapping[str, Sequence[float]] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """A row of the clean test (corruption "none", severity 0), then one per corruption and severity
    (1, 2, 3 at the levels of `CORRUPTIONS` unless `levels` says otherwise): its level and unit, and the
    test metrics under it (`ROW_METRICS`, fractions), on the first `limit` test images (None: all)."""
    levels = levels or {name: corruption.levels for name, corruption in CORRUPTIONS.items()}
    cells: list[tuple[str | None, int, float]] = [(None, 0, 0.0)]
    cells += [(name, k, level) for name, values in levels.items() for k, level in enumerate(values, start=1)]
    rows = []
    for name, severity, level in cells:
        cell_seed = corruption_seed(seed, name, severity) if name is not None else 0
        batches = CorruptedBatches(test_batches, name, level, cell_seed, limit)
        metrics = trainer.test(module, dataloaders=batches, verbose=False)[0]
        row = {
            "corruption": name or "none",
            "severity": severity,
            "level": level,
            "unit": CORRUPTIONS[name].unit if name is not None else "",
        }
        row |= {key: float(metrics[f"test/{key}"]) for key in ROW_METRICS}
        rows.append(row)
        log.info(
            "%s severity %d: digit %.4f, sum %.4f",
            row["corruption"],
            severity,
            row["digit_acc"],
            row["sum_acc"],
        )
    return rows


def format_robustness(rows: Sequence[dict[str, Any]]) -> str:
    """The table for people: accuracy in percent per corruption and severity."""
    header = (
        f"{'corruption':<16}{'severity':>9}{'level':>8}  {'unit':<24}{'digit acc %':>12}{'sum acc %':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['corruption']:<16}{row['severity']:>9}{row['level']:>8g}  {row['unit']:<24}"
            f"{100 * row['digit_acc']:>12.2f}{100 * row['sum_acc']:>11.2f}"
        )
    return "\n".join(lines)
