"""``rgbt-seg make-sample-bag OUT``: a synthetic RGB-thermal ROS 2 bag with ground-truth labels."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output directory: OUT/bag (the bag) and OUT/calibration.yaml")
    p.add_argument("--frames", type=int, default=40, help="RGB frames to record (default 40)")
    p.add_argument("--fps", type=float, default=10.0, help="camera rate in Hz (default 10)")
    p.add_argument("--thermal-offset-ms", type=float, default=8.0, help="thermal trigger delay after RGB (default 8)")
    p.add_argument("--jitter-ms", type=float, default=2.0, help="Gaussian stamp jitter per camera (default 2)")
    p.add_argument("--drop-rate", type=float, default=0.0, help="probability that a camera drops a frame (default 0)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="bag storage (default mcap)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--thermal-shift",
        type=float,
        nargs=2,
        default=(0.0, 0.0),
        metavar=("DX", "DY"),
        help="record a rig whose thermal camera moved after calibration: registered thermal sits DX, DY RGB "
        "pixels off the written calibration (default 0 0)",
    )
    p.add_argument(
        "--rgb-gap",
        type=float,
        nargs=2,
        default=None,
        metavar=("START", "END"),
        help="the RGB camera is silent from START to END seconds while thermal keeps running",
    )
    p.add_argument("--force", action="store_true", help="replace OUT/bag if it exists")


def run(args: argparse.Namespace) -> int:
    from ..data.sample_bag import write_sample_bag

    bag = args.out / "bag"
    if bag.exists():
        if not args.force:
            print(f"error: {bag} already exists (use --force to replace it)", file=sys.stderr)
            return 1
        shutil.rmtree(bag)
    t0 = time.perf_counter()
    try:
        path = write_sample_bag(
            args.out,
            frames=args.frames,
            fps=args.fps,
            thermal_offset_ms=args.thermal_offset_ms,
            jitter_ms=args.jitter_ms,
            drop_rate=args.drop_rate,
            storage=args.storage,
            seed=args.seed,
            thermal_shift_px=tuple(args.thermal_shift),
            rgb_gap=None if args.rgb_gap is None else tuple(args.rgb_gap),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {path} ({args.frames} frames at {args.fps:g} Hz, {args.storage}) and "
        f"{args.out / 'calibration.yaml'} in {time.perf_counter() - t0:.1f} s"
    )
    return 0
