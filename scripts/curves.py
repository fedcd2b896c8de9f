"""Compare learning curves: python scripts/curves.py RUN_DIR [RUN_DIR ...] [--tags val/digit_acc ...]."""

import argparse
from argparse import Namespace
from pathlib import Path

from mnist_adder.cli import guarded
from mnist_adder.reporting.curves import curves_table


def parse_args() -> Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (each with tensorboard/)")
    parser.add_argument("--tags", nargs="+", default=["val/digit_acc", "val/sum_acc"])
    parser.add_argument("--names", nargs="+", help="column names, one per run folder")
    return parser.parse_args()


def run(args: Namespace) -> None:
    print(curves_table(args.run_dirs, args.tags, args.names))


if __name__ == "__main__":
    guarded(run, parse_args())
