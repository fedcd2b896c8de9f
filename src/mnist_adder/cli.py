"""What every entry script shares: a user's mistake becomes one clear paragraph and exit code 2."""

import logging
import sys
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mnist_adder.errors import UserError

log = logging.getLogger(__name__)


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def guarded(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run `task(cfg)`; on a UserError print its message (no traceback) and exit with status 2.

    In a multirun the error is logged and raised again so that Hydra records this job as failed and
    still runs the others.
    """
    try:
        return task(cfg)
    except UserError as err:
        log.error("%s", err)
        if _in_multirun():
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
