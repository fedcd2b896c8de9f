"""Run results on disk (metrics.json, written atomically) and as a table for people."""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mnist_adder.errors import UserError

# Shown as they are, not in percent: a loss, calibration errors and the coherence gap (gaps between
# probabilities, not accuracies).
PLAIN_METRICS = (
    "loss",
    "digit_ece",
    "sum_ece",
    "sum_coherence_gap",
    "digit_ece_uncalibrated",
    "sum_ece_uncalibrated",
)
# The seen/unseen pair accuracies exist only in runs that held pairs out (data.heldout_pairs).
TABLE_METRICS = (
    "digit_acc",
    "sum_acc",
    "both_acc",
    "sum_given_digit_acc",
    "sum_acc_seen_pairs",
    "sum_acc_unseen_pairs",
    "sum_acc_unseen_sums",
    # MNIST addition (data=mnist_addition): the most probable sum, and digit_acc^(2N).
    "sum_acc_map",
    "sum_acc_ceiling",
    *PLAIN_METRICS,
)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; it replaces `path` only if the block ends without error,
    so a reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never half of it."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_run_files(output_dir: Path, files: dict[str, dict[str, Any] | None]) -> None:
    """Write each of `files` (name: content, None: not written) into `output_dir` as JSON, each whole or
    not at all; a UserError for a file that cannot be written."""
    for name, content in ((n, c) for n, c in files.items() if c is not None):
        try:
            write_json_atomic(output_dir / name, content)
        except OSError as err:
            raise UserError(
                f"could not write {output_dir / name}: {err.strerror or err}; no partial file was "
                "left (the results are in the log above). Free disk space or make the folder writable."
            ) from err


def format_results(metrics: dict[str, Any], stage: str = "test") -> str:
    """A short table of one stage's metrics: accuracies in percent, the loss and calibration errors as is."""
    rows = []
    for name in TABLE_METRICS:
        value = metrics.get(f"{stage}/{name}")
        if value is not None:
            text = f"{value:.4f}" if name in PLAIN_METRICS else f"{100 * value:.2f} %"
            rows.append((f"{stage}/{name}", text))
    if metrics.get("num_parameters") is not None:
        rows.append(("parameters", f"{metrics['num_parameters']:,}"))
    if metrics.get("fit_seconds") is not None:
        rows.append(("fit seconds", f"{metrics['fit_seconds']:.1f}"))
    lines = [f"{'metric':<30}{'value':>10}", "-" * 40, *(f"{k:<30}{v:>10}" for k, v in rows)]
    if metrics.get("ckpt_path"):
        lines.append(f"checkpoint: {metrics['ckpt_path']}")
    return "\n".join(lines)


def format_per_class(metrics: dict[str, Any], stage: str = "test", per_row: int = 10) -> str:
    """The per-class accuracies of both heads (`{stage}/{head}_acc_per_class` lists), in percent."""
    lines = []
    for head in ("digit", "sum"):
        values = metrics.get(f"{stage}/{head}_acc_per_class")
        for start in range(0, len(values or []), per_row):
            chunk = values[start : start + per_row]
            lines.append(f"{'class':<12}" + "".join(f"{c:>7}" for c in range(start, start + len(chunk))))
            lines.append(f"{head + '_acc %':<12}" + "".join(f"{100 * v:>7.1f}" for v in chunk))
    return "\n".join(lines)
