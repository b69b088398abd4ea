"""``rgbt-seg pairs BAG``: which RGB / thermal messages of a bag the node would pair.

Reads a ROS 2 (sqlite3, mcap) or ROS 1 bag with rosbags, feeds the header stamps in bag (receive)
order to the same :class:`~rgbt_seg_ros.pipeline.sync.ApproximateTimePairer` the node uses (the bag's receive
time stands in for the node's clock, so ``--max-wait`` acts as it would live), prints the counts and
the stamp differences, and optionally writes one CSV row per pair
(``rgb_stamp_ns,thermal_stamp_ns,dt_ms`` with ``dt = thermal - rgb``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from ..data.bags import BagError, bag_topics, read_messages, stamp_to_ns
from ..pipeline.frame_flow import pairer_from_params
from ..pipeline.sync import ApproximateTimePairer, Pair, PairingStats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", metavar="BAG", help="ROS 2 bag directory (sqlite3 or mcap) or ROS 1 .bag file")
    parser.add_argument("--rgb-topic", default="/rgb/image", help="RGB image topic (default %(default)s)")
    parser.add_argument("--thermal-topic", default="/thermal/image", help="thermal image topic (default %(default)s)")
    parser.add_argument("--slop", type=float, default=0.05, help="largest stamp difference of a pair, seconds")
    parser.add_argument("--queue-size", type=int, default=5, help="unpaired messages kept per stream")
    parser.add_argument("--exact", action="store_true", help="pair identical stamps only")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=0.1,
        help="longest wait for a better partner on the receive clock, seconds (0: release each pair at once)",
    )
    parser.add_argument("--csv", metavar="FILE", help="write rgb_stamp_ns,thermal_stamp_ns,dt_ms per pair")


def bag_pairs(
    bag: str | Path,
    rgb_topic: str,
    thermal_topic: str,
    pairer: ApproximateTimePairer,
    use_receive_clock: bool = True,
) -> Iterator[Pair]:
    """Feed a bag's image header stamps to ``pairer`` in receive order and yield each pair as it is formed
    (payload = the bag message), so only the pairer's queues are held. A :class:`BagError` (a missing topic,
    damage part-way) is raised where it happens, after the pairs formed before it."""
    bag = Path(bag)
    topics = bag_topics(bag)
    missing = [t for t in (rgb_topic, thermal_topic) if t not in topics]
    if missing:
        listing = ", ".join(sorted(topics)) or "none"
        raise BagError(f"bag {bag} has no topic {', '.join(missing)}; topics in the bag: {listing}")
    for m in read_messages(bag, [rgb_topic, thermal_topic]):
        header = getattr(m.msg, "header", None)
        if header is None:
            raise BagError(f"bag {bag}: topic {m.topic} ({m.msgtype}) has no header stamp to pair on")
        now = m.log_time_ns if use_receive_clock else None
        add = pairer.add_rgb if m.topic == rgb_topic else pairer.add_thermal
        yield from add(stamp_to_ns(header.stamp), m, now)
    yield from pairer.flush()


def pair_bag(
    bag: str | Path,
    rgb_topic: str,
    thermal_topic: str,
    pairer: ApproximateTimePairer,
    use_receive_clock: bool = True,
) -> tuple[list[Pair], PairingStats]:
    """Every pair of :func:`bag_pairs` in a list, and the pairer's counts."""
    pairs = list(bag_pairs(bag, rgb_topic, thermal_topic, pairer, use_receive_clock))
    return pairs, pairer.stats


def run(args: argparse.Namespace) -> int:
    from ..pipeline.params import validate

    # the node's ranges for the same settings (config/segment.yaml: sync.*)
    for flag, name, value in (
        ("--max-wait", "sync.max_wait", args.max_wait),
        ("--slop", "sync.slop", args.slop),
        ("--queue-size", "sync.queue_size", args.queue_size),
    ):
        problem = validate(name, value)
        if problem:
            print(f"rgbt-seg pairs: {flag} {value} is refused: {problem}", file=sys.stderr)
            return 2
    try:
        params = {
            "sync.queue_size": args.queue_size,
            "sync.slop": args.slop,
            "sync.exact": args.exact,
            "sync.max_wait": args.max_wait,
        }
        pairer = pairer_from_params(params, on_warning=lambda text: print(f"warning: {text}", file=sys.stderr))
    except ValueError as exc:
        print(f"rgbt-seg pairs: {exc}", file=sys.stderr)
        return 2
    try:
        pairs, stats = pair_bag(args.bag, args.rgb_topic, args.thermal_topic, pairer)
    except BagError as exc:
        print(f"rgbt-seg pairs: {exc}", file=sys.stderr)
        return 1
    mode = "exact" if args.exact else f"slop {args.slop * 1e3:g} ms"
    print(f"{args.bag}: {args.rgb_topic} + {args.thermal_topic}, {mode}, queue {args.queue_size}")
    print(stats.summary())
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rgb_stamp_ns", "thermal_stamp_ns", "dt_ms"])
            for p in pairs:
                writer.writerow([p.rgb_stamp_ns, p.thermal_stamp_ns, f"{p.dt_ns / 1e6:.6f}"])
        print(f"wrote {len(pairs)} pairs to {path}")
    return 0
