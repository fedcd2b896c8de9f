"""Which process of a multi-process run this one is, read from what its launcher set, before Hydra writes
anything: conf/hydra/default.yaml names each process's log and config files after it.

torchrun (also inside a Kubernetes PyTorchJob) sets RANK for each process it starts, srun SLURM_PROCID
(Lightning's SLURM environment reads the same). Lightning's own DDP launcher (trainer=ddp on one machine)
sets neither: it gives the processes it starts their Hydra folder and log name itself
(`hydra.run.dir`, `train_ddp_process_<R>.log`), so those keep the names it gives.
"""

import os

RANK_VARIABLES = ("RANK", "SLURM_PROCID")


def launcher_global_rank() -> int:
    """This process's global rank as torchrun or srun set it; 0 where neither did."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def rank_log_suffix() -> str:
    """'' for global rank 0, '_rank<R>' for the others: the end of each process's log file name, so that
    processes sharing one run folder (hydra.run.dir) never write into the same file."""
    rank = launcher_global_rank()
    return f"_rank{rank}" if rank else ""


def on_rank_zero(value: str) -> str | None:
    """`value` in global rank 0, None in the others: the run's config (`.hydra/`) is written once."""
    return value if launcher_global_rank() == 0 else None
