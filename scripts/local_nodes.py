"""N training nodes on this machine, as on a cluster: python scripts/local_nodes.py N [train overrides...]."""

import os
from argparse import Namespace
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from mnist_adder.cli import guarded
from mnist_adder.tools.local_nodes import parse_args, run_local_nodes


def run(args: Namespace) -> None:
    run_local_nodes(args.nodes, args.overrides)


if __name__ == "__main__":
    guarded(run, parse_args())
