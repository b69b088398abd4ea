"""``rgbt-seg make-sample-dataset OUT --layout ...``: a small dataset in a benchmark's exact layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..data.sample_dataset import LAYOUTS

    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--layout", choices=LAYOUTS, required=True, help="folder layout and file formats to write")
    p.add_argument("--count", type=int, default=8, help="number of samples, about 3:1 train:test (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: the benchmark's)")


def run(args: argparse.Namespace) -> int:
    from ..data.sample_dataset import write_sample_dataset

    try:
        out = write_sample_dataset(
            args.out, args.layout, count=args.count, seed=args.seed, size=tuple(args.size) if args.size else None
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.count} samples in the {args.layout} layout to {out}")
    return 0
