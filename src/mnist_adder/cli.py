"""What every entry script shares: a user's mistake becomes one clear paragraph and exit code 2.

`build` is how every object in a config (datamodule, model, trainer, callbacks, loggers) is made: a
constructor that refuses a value (ValueError, TypeError, Lightning's MisconfigurationException) becomes
one line naming the config key, its target and the constructor's reason.
"""

import errno
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import hydra
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


# Where run_hydra_main keeps the user's own HYDRA_FULL_ERROR (it sets HYDRA_FULL_ERROR=1 itself). An
# environment variable, so that processes started by this one (DDP ranks, sweep workers) see it too.
_USER_FULL_ERROR = "MNIST_ADDER_USER_HYDRA_FULL_ERROR"


def full_error_wanted() -> bool:
    """Whether the user asked for full tracebacks (HYDRA_FULL_ERROR=1 on the command line)."""
    return os.environ.get(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", "")) == "1"


def _bad_value_cause(err: BaseException) -> BaseException | None:
    """The constructor's own error inside Hydra's InstantiationException, if it is the kind a bad config
    value raises (ValueError, TypeError, MisconfigurationException); None for anything else (maybe a bug)."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException  # = Lightning's own

    cause = err.__cause__
    if isinstance(err, InstantiationException) and isinstance(
        cause, ValueError | TypeError | MisconfigurationException
    ):
        return cause
    return None


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _instantiation_line(err: InstantiationException, cause: BaseException, key: str) -> str:
    # Hydra names the innermost failing node ("full_key: model.net") and its target.
    match = re.search(r"^full_key: (\S+)$", str(err), flags=re.M)
    full_key = match.group(1) if match else key
    target = re.search(r"target '([^']+)'", str(err))
    what = f"{full_key} ({target.group(1)})" if target else full_key
    given = []
    if HydraConfig.initialized():  # the command-line overrides of this node, its parents or its keys
        for override in HydraConfig.get().overrides.task:
            name = override.lstrip("+~").split("=", 1)[0]
            if f"{full_key}.".startswith(f"{name}.") or name.startswith(f"{full_key}."):
                given.append(override)
    from_cli = f" (given: {' '.join(given)})" if given else ""
    return (
        f"{what} cannot be built from its config{from_cli}: {_one_line(str(cause)).rstrip('.')}. "
        "Change that value on the command line or in conf/."
    )


def build(node: Any, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)`; a constructor refusing a config value becomes a UserError
    (one line: the key, the target, the reason). Other errors, and all with HYDRA_FULL_ERROR=1, propagate
    with their traceback. `key` names the node where Hydra cannot (a detached config)."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = _bad_value_cause(err)
        if cause is None or full_error_wanted():
            raise
        raise UserError(_instantiation_line(err, cause, key)) from err


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
    if isinstance(err, InstantiationException):
        # Hydra building an object of its own config (a launcher, a sweeper, a callback): a refused value
        # is the user's; any other error while building may be a bug and keeps its traceback.
        cause = _bad_value_cause(err)
        return _instantiation_line(err, cause, "hydra") if cause is not None else None
    if isinstance(err, CompactHydraException):
        # Hydra's own text, less the config search path it appends, on one line.
        text = str(err).split("\nConfig search path:", 1)[0]
        if isinstance(err.__cause__, OmegaConfBaseException):
            text += f" ({str(err.__cause__).splitlines()[0]})"
        return _one_line(text)
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
    os.environ.setdefault(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", ""))
    wants_full_error = full_error_wanted()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as err:
        line = str(err) if isinstance(err, UserError) else hydra_error_line(err)
        if line is None or wants_full_error:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
