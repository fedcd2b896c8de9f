"""What every entry script shares: a user's mistake becomes one clear paragraph and exit code 2."""

import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException, MissingConfigException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from mnist_adder.errors import UserError

log = logging.getLogger(__name__)
Args = TypeVar("Args")


class JobFailed(CompactHydraException):
    """A multirun job stopped by a UserError. Hydra prints a CompactHydraException as its message alone."""


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def guarded(task: Callable[[Args], Any], cfg: Args) -> Any:
    """Run `task(cfg)`; on a UserError print its message (no traceback) and exit with status 2.

    In a multirun the error is logged and raised again so that Hydra records this job as failed and
    still runs the others; once they have run, Hydra prints the first failure's message, no traceback.
    """
    try:
        return task(cfg)
    except UserError as err:
        if HydraConfig.initialized():  # into the run's log; a plain script has none and would print it twice
            log.error("%s", err)
        if _in_multirun():
            raise JobFailed(f"{err} (run folder: {HydraConfig.get().runtime.output_dir})") from err
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# Errors a user can fix that reach us as OSError: a folder that cannot be created or written, a full disk.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def hydra_error_line(err: BaseException) -> str | None:
    """One line for an error Hydra raises before our code runs, or None if it is not such an error."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, choice = err.missing_cfg_file.rsplit("/", 1)
        options = ", ".join(err.options or []) or "none found"
        return (
            f"{group}={choice} is not a known choice: there is no conf/{group}/{choice}.yaml; "
            f"choose one of: {options}."
        )
    if isinstance(err, CompactHydraException) and not isinstance(err, InstantiationException):
        # Hydra's own text, less the config search path it appends, on one line. (An error while
        # building an object from the config may be a bug: that one keeps its traceback.)
        text = str(err).split("\nConfig search path:", 1)[0]
        if isinstance(err.__cause__, OmegaConfBaseException):
            text += f" ({str(err.__cause__).splitlines()[0]})"
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS and err.filename:
        return (
            f"cannot write {err.filename}: {err.strerror}. Choose a folder you can write to "
            "(hydra.run.dir=... or paths.log_dir=...) or free disk space."
        )
    return None


def run_hydra_main(main: Callable[[], Any]) -> None:
    """Call a `@hydra.main` function so that mistakes Hydra finds before our code runs (an unknown
    config choice, a bad override, a run folder it cannot create) end like a UserError: one line on
    stderr, exit status 2, no traceback. Other errors keep their traceback.

    Hydra prints those errors itself over several lines (its config search path, a traceback for a
    folder it cannot create); with HYDRA_FULL_ERROR=1 it raises them instead, to be reported here.
    A user who sets HYDRA_FULL_ERROR=1 gets Hydra's full report, as Hydra documents.
    """
    wants_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as err:
        line = str(err) if isinstance(err, UserError) else hydra_error_line(err)
        if line is None or wants_full_error:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
