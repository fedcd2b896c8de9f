"""Multi-process training: what it may do inside a Hydra multirun, and how it ends when a process is lost."""

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch.distributed
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

from mnist_adder.cli import _in_multirun
from mnist_adder.errors import UserError
from mnist_adder.training.callbacks import newest_checkpoint

# What gloo and NCCL say when a peer is gone or silent; gloo raises them as plain RuntimeErrors.
_LOST_PEER = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|timeout|broken pipe", re.IGNORECASE)


def check_process_launch(trainer: pl.Trainer) -> None:
    """Refuse DDP that would start its own processes inside a multirun, and a trainer whose processes
    (trainer.devices per node times trainer.num_nodes) are not those that torchrun or SLURM started.

    Lightning starts ranks > 0 by re-running the command line. In a multirun that command line is the
    whole sweep, so every extra process would run a sweep of its own, in a sweep folder of its own. Where
    a cluster starts the processes (SLURM tasks through the submitit launcher) nothing is re-run.
    """
    environment = getattr(trainer.strategy, "cluster_environment", None)
    started_outside = environment is not None and environment.creates_processes_externally
    if started_outside:
        try:  # otherwise Lightning raises this when training starts, as a traceback
            environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
        except ValueError as err:
            raise UserError(
                f"{str(err).rstrip('.')} (the processes {type(environment).__name__} started). Every node "
                "needs trainer.devices = the processes started on it (torchrun --nproc_per_node, SLURM "
                "--ntasks-per-node) and trainer.num_nodes = the nodes (torchrun --nnodes, SLURM --nodes)."
            ) from err
    # DDP's launcher is a _SubprocessScriptLauncher in either case; it re-runs nothing where torchrun or
    # SLURM started the processes.
    relaunches = isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and not started_outside
    if _in_multirun() and relaunches:
        raise UserError(
            f"{type(trainer.strategy).__name__} on {trainer.num_devices} devices (trainer.strategy) starts "
            "its other processes by re-running the command line, and in a multirun (-m) that command line is "
            "the whole sweep. Run multi-process trainings one at a time (without -m), sweep with a "
            "single-device trainer (trainer=cpu or trainer=gpu), or sweep on SLURM with "
            "hydra/launcher=slurm, where SLURM starts the processes."
        )


def is_lost_peer(trainer: pl.Trainer, err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another process of this run is gone or silent."""
    if trainer.world_size < 2 or not isinstance(err, RuntimeError):
        return False
    return isinstance(err, torch.distributed.DistError) or bool(_LOST_PEER.search(str(err)))


def _first_sentence(err: BaseException) -> str:
    # gloo's starts with its source location: "[.../gloo/transport/tcp/pair.cc:561] Connection closed by
    # peer [127.0.0.1]:7556. This is typically caused by a remote worker crashing. ..."
    line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ", 1)[0].rstrip(".")


@contextmanager
def lost_peers_stop_clearly(trainer: pl.Trainer, doing: str) -> Iterator[None]:
    """Turn a collective that failed because another process died or hung into one UserError paragraph.

    A process that dies closes its connections, and the others' next collective (the gradient all-reduce
    of the next step, a barrier, a metric sync) fails at once; one that hangs, or whose machine vanishes,
    is given up on after the strategy's timeout (trainer.strategy.timeout). Either way the run cannot go
    on with fewer processes: this one stops and says how to continue.
    """
    try:
        yield
    except RuntimeError as err:
        if not is_lost_peer(trainer, err):
            raise
        checkpoint = newest_checkpoint(trainer)
        resume = (
            f"The newest checkpoint on this machine is {checkpoint}: start every node again with "
            f"ckpt_path={checkpoint} to continue from it."
            if checkpoint is not None
            else "No checkpoint had been written on this machine yet: start every node again."
        )
        raise UserError(
            f"lost contact with another process of this run during {doing} (this is global rank "
            f"{trainer.global_rank} of {trainer.world_size} processes on {trainer.num_nodes} node(s); "
            f"{_first_sentence(err)}). A process or its node stopped (killed, out of memory, machine down "
            "or unreachable) or hung past trainer.strategy.timeout; its own output says why. The run "
            f"cannot go on without it, so this process stopped too. {resume}"
        ) from err
