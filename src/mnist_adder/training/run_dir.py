"""Which folder a run writes into: never one that holds another run's results, and, when a run is
resumed from a checkpoint of an unfinished run, that run's own folder, so its curves continue.

Layout of a run folder: `<run>/checkpoints/*.ckpt`, `<run>/tensorboard/`, `<run>/metrics.json`. Folder
names carry microseconds, so two runs started in the same second get two folders; `claim_output_dir`
also refuses a folder that already holds a metrics.json or checkpoints unless this run resumes it.
"""

import logging
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from mnist_adder.cli import _in_multirun
from mnist_adder.errors import UserError

log = logging.getLogger(__name__)

RESUMED_INTO = "resumed_into.txt"
RESUMES = "resumes.txt"


def run_folder_of(ckpt_path: Path) -> Path | None:
    """The run folder a checkpoint was written into (`<run>/checkpoints/x.ckpt`), or None."""
    ckpt_path = ckpt_path.resolve()
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None


def _outputs_in(folder: Path) -> list[str]:
    found = ["metrics.json"] if (folder / "metrics.json").exists() else []
    if any((folder / "checkpoints").glob("*.ckpt")):
        found.append("checkpoints/")
    return found


def ensure_writable(folder: Path) -> None:
    """Create `folder` and write a probe file in it; a UserError naming the folder if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write to the run folder {folder}: {err.strerror or err}. Choose a folder you can write "
            "to with hydra.run.dir=... (or paths.log_dir=...), or free disk space."
        ) from err


def claim_output_dir(output_dir: Path, ckpt_path: str | os.PathLike | None, multirun: bool = False) -> Path:
    """Decide and check the folder this run writes into; return it.

    - No checkpoint: `output_dir` (Hydra's fresh folder), refused if it already holds a run's outputs.
    - Resuming from `<run>/checkpoints/*.ckpt` of a run that has no metrics.json (it did not finish):
      `<run>` itself, so checkpoints, TensorBoard curves and metrics.json continue there; Hydra's
      folder for this command keeps its own config and log plus `resumed_into.txt`, and `<run>` gets a
      line in `resumes.txt`. In a multirun every job keeps its own folder.
    - Resuming a finished run (it has metrics.json): a new folder, so its results are not overwritten.
    Resuming into `output_dir` itself (hydra.run.dir=<run>) is always allowed: that is on purpose.
    """
    output_dir = Path(output_dir).resolve()
    if ckpt_path is not None:  # checked to be a checkpoint of this config by config_checks.check_resume
        ckpt = Path(ckpt_path)
        origin = run_folder_of(ckpt)
        if origin == output_dir:
            ensure_writable(output_dir)
            return output_dir
        if origin is not None and not multirun and not (origin / "metrics.json").exists():
            ensure_writable(origin)
            _link(output_dir, origin, ckpt)
            log.info("Resuming %s: continuing in its run folder %s", ckpt, origin)
            return origin
    used = _outputs_in(output_dir)
    if used:
        raise UserError(
            f"the run folder {output_dir} already holds another run's outputs ({', '.join(used)}); a run "
            "never writes over another. Choose a new folder (hydra.run.dir=...), or continue that run "
            f"with ckpt_path={output_dir / 'checkpoints' / 'last.ckpt'}."
        )
    ensure_writable(output_dir)
    return output_dir


def _link(session_dir: Path, origin: Path, ckpt: Path) -> None:
    # Both ways, so either folder leads to the other; a link that cannot be written costs no training.
    if rank_zero_only.rank != 0:  # DDP: every process decides the same folder, one writes the links
        return
    try:
        session_dir.mkdir(parents=True, exist_ok=True)
        (session_dir / RESUMED_INTO).write_text(f"{origin}\n")
        with (origin / RESUMES).open("a") as f:
            f.write(f"resumed from {ckpt.resolve()}; log and config of that command: {session_dir}\n")
    except OSError as err:
        log.warning("Could not record the link between %s and %s: %s", session_dir, origin, err)


def claim_run_folder(cfg: DictConfig) -> Path:
    """`claim_output_dir` for a training config; a resumed run continues in the checkpoint's own run
    folder, and `cfg.paths.output_dir` then names it."""
    output_dir = claim_output_dir(Path(cfg.paths.output_dir), cfg.get("ckpt_path"), _in_multirun())
    if output_dir != Path(cfg.paths.output_dir).resolve():
        cfg.paths.output_dir = str(output_dir)
    return output_dir
