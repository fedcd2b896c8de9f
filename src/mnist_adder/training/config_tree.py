"""The resolved config printed as a tree when a run starts (rich), as in the lightning-hydra-template."""

from collections.abc import Sequence

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

# The groups a reader looks for first; the other keys follow in the config's own order.
FIRST = ("data", "model", "callbacks", "logger", "trainer", "paths", "extras")


@rank_zero_only  # DDP starts one process per device: one tree, not one per process
def print_config_tree(cfg: DictConfig, first: Sequence[str] = FIRST) -> None:
    """Print every top-level key of `cfg` as a branch holding its resolved YAML."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [key for key in first if key in cfg] + [key for key in cfg if key not in first]
    for key in keys:
        value = cfg[key]
        is_node = isinstance(value, DictConfig | ListConfig)
        text = OmegaConf.to_yaml(value, resolve=True) if is_node else str(value)
        tree.add(key, style="dim", guide_style="dim").add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
