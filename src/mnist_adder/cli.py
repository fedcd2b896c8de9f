"""What every entry script shares: a user's mistake becomes one clear paragraph and exit code 2."""

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode

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
