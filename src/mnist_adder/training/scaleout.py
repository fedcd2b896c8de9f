"""What multi-process training may do inside a Hydra multirun."""

import pytorch_lightning as pl
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

from mnist_adder.cli import _in_multirun
from mnist_adder.errors import UserError


def check_process_launch(trainer: pl.Trainer) -> None:
    """Refuse DDP that would start its own processes inside a multirun.

    Lightning starts ranks > 0 by re-running the command line. In a multirun that command line is the
    whole sweep, so every extra process would run a sweep of its own, in a sweep folder of its own. Where
    a cluster starts the processes (SLURM tasks through the submitit launcher) nothing is re-run.
    """
    if _in_multirun() and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        raise UserError(
            f"{type(trainer.strategy).__name__} on {trainer.num_devices} devices (trainer.strategy) starts "
            "its other processes by re-running the command line, and in a multirun (-m) that command line is "
            "the whole sweep. Run multi-process trainings one at a time (without -m), sweep with a "
            "single-device trainer (trainer=cpu or trainer=gpu), or sweep on SLURM with "
            "hydra/launcher=slurm, where SLURM starts the processes."
        )
