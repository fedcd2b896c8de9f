"""Learning curves of several runs side by side, read back from their TensorBoard event files."""

from collections.abc import Sequence
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_adder.errors import UserError


def _events(run_dir: str | Path) -> tuple[Path, EventAccumulator]:
    """The scalars of `<run_dir>/tensorboard` (or of run_dir itself), every point of them."""
    run_dir = Path(run_dir)
    event_dir = run_dir / "tensorboard" if (run_dir / "tensorboard").is_dir() else run_dir
    if not any(event_dir.glob("events.out.tfevents.*")):
        raise UserError(f"No TensorBoard event files in {event_dir}: give run folders written by train.py.")
    return event_dir, EventAccumulator(str(event_dir), size_guidance={"scalars": 0}).Reload()


def read_scalars(run_dir: str | Path, tag: str) -> dict[int, float]:
    """{global step: value} of one scalar tag in `<run_dir>/tensorboard` (or run_dir itself)."""
    event_dir, events = _events(run_dir)
    if tag not in events.Tags()["scalars"]:
        raise UserError(f"{event_dir} has no scalar {tag!r}; it has: {', '.join(events.Tags()['scalars'])}")
    return {event.step: event.value for event in events.Scalars(tag)}


def epoch_curves(run_dir: str | Path, tags: Sequence[str]) -> dict[str, list[list[float]]]:
    """{tag: [[epoch, value], ...]} of the epoch-level scalars among `tags` (epochs counted from 1).

    Lightning logs the scalar `epoch` (from 0) with every point, so each point's epoch is the `epoch`
    logged at its step. Tags the run lacks are left out; a tag logged several times per epoch (e.g. with
    trainer.val_check_interval) keeps the last value of each epoch.
    """
    _, events = _events(run_dir)
    logged = set(events.Tags()["scalars"])
    if "epoch" not in logged:
        return {}
    epoch_at = {}
    for event in events.Scalars("epoch"):
        epoch_at.setdefault(event.step, int(event.value))
    curves = {}
    for tag in (t for t in tags if t in logged):
        by_epoch = {epoch_at[e.step] + 1: e.value for e in events.Scalars(tag) if e.step in epoch_at}
        curves[tag] = [[epoch, value] for epoch, value in sorted(by_epoch.items())]
    return curves


def curves_table(run_dirs: list[Path], tags: list[str], names: list[str] | None = None) -> str:
    """A markdown table: one row per logged step, one column per (run, tag), values in percent."""
    names = names or [Path(d).name for d in run_dirs]
    columns = {
        (name, tag): read_scalars(d, tag) for name, d in zip(names, run_dirs, strict=True) for tag in tags
    }
    steps = sorted({step for values in columns.values() for step in values})
    header = "| step | " + " | ".join(f"{name} {tag}" for name, tag in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for step in steps:
        cells = [f"{100 * values[step]:.2f}" if step in values else "" for values in columns.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
