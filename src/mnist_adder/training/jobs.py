"""What a finished Hydra job leaves besides its results: job_status.json (completed or failed, and why).

A job without metrics.json may have failed, been killed, or still be running; the status file tells the
first apart, so scripts/report.py can list a failed job with its error instead of guessing.
"""

import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mnist_adder.results import write_json_atomic

log = logging.getLogger(__name__)

JOB_STATUS_FILE = "job_status.json"


def _process_rank() -> int:
    # DDP processes run the job too (Lightning re-runs the script, SLURM starts one task per GPU):
    # only rank zero speaks for the job. Imported here so that reading statuses needs no Lightning.
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


class JobStatusCallback(Callback):
    """Hydra callback (conf/hydra/default.yaml): writes `<output_dir>/job_status.json` when a job ends."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if _process_rank() != 0:
            return
        failed = job_return.status == JobStatus.FAILED
        # `return_value` would re-raise a failure; the stored value is the exception itself.
        error = job_return._return_value if failed else None
        status = {
            "status": job_return.status.name,
            "error": _describe(error) if error is not None else None,
            "overrides": list(job_return.overrides or []),
        }
        write_json_atomic(Path(config.hydra.runtime.output_dir) / JOB_STATUS_FILE, status)


def _describe(error: BaseException) -> str:
    # A user's mistake (cli.JobFailed) speaks for itself; anything else is named by its type.
    return str(error) if isinstance(error, CompactHydraException) else f"{type(error).__name__}: {error}"


def read_job_status(job_dir: Path) -> dict[str, Any] | None:
    """The job_status.json of a job folder, or None when the job never finished (or predates it)."""
    path = job_dir / JOB_STATUS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("unreadable %s", path)
        return None
