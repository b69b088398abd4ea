"""``rgbt-seg reindex BAG`` / ``rgbt-seg recover BAG``: what a damaged recording still holds.

``reindex`` rewrites ``metadata.yaml`` from the storage files (as ``ros2 bag reindex`` does);
``recover`` copies every complete message of a cut-off MCAP or sqlite3 bag into a new, valid bag
(as ``mcap recover`` does). ``rgbt-seg replay`` reads damaged bags directly; these are for the
other tools (``ros2 bag play``, ``ros2 bag info``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_reindex_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bag", type=Path, help="ROS 2 bag directory whose metadata.yaml is missing or wrong")


def add_recover_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bag", type=Path, help="ROS 2 bag directory (or .mcap / .db3 file) cut off or damaged")
    p.add_argument("--out", type=Path, default=None, help="new bag directory (default BAG.recovered)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="storage of the new bag")


def run_reindex(args: argparse.Namespace) -> int:
    from ..data.bag_recovery import reindex

    try:
        meta = reindex(args.bag)
    except (FileNotFoundError, ValueError, NotADirectoryError) as exc:
        print(f"rgbt-seg reindex: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {meta}" + (" (the old one is metadata.yaml.bak)" if (args.bag / "metadata.yaml.bak").exists() else "")
    )
    return 0


def run_recover(args: argparse.Namespace) -> int:
    from ..data.bag_recovery import RecoveredBag
    from ..data.bags import BagWriter

    out = args.out or args.bag.with_name(args.bag.name + ".recovered")
    if out.exists():
        print(f"rgbt-seg recover: {out} already exists; choose another --out", file=sys.stderr)
        return 1
    try:
        recovered = RecoveredBag(args.bag)
    except FileNotFoundError as exc:
        print(f"rgbt-seg recover: {exc}", file=sys.stderr)
        return 1
    n = 0
    with BagWriter(out, storage=args.storage) as writer:
        for m in recovered.messages():
            writer.write_raw(m.topic, m.msgtype, m.data, m.log_time_ns)
            n += 1
    for damage in recovered.damage:
        print(f"damage: {damage.sentence()}", file=sys.stderr)
    print(f"wrote {out}: {n} complete messages" + (" (the input had no damage)" if not recovered.damage else ""))
    return 0
