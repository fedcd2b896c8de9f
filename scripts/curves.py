"""Compare learning curves: python scripts/curves.py RUN_DIR [RUN_DIR ...] [--tags val/digit_acc ...]."""

import argparse
import sys
from pathlib import Path

from mnist_adder.curves import curves_table
from mnist_adder.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (each with tensorboard/)")
    parser.add_argument("--tags", nargs="+", default=["val/digit_acc", "val/sum_acc"])
    parser.add_argument("--names", nargs="+", help="column names, one per run folder")
    args = parser.parse_args()
    try:
        print(curves_table(args.run_dirs, args.tags, args.names))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
