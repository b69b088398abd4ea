"""``rgbt-seg play BAG``: play a ROS 2 bag over DDS with its recorded timing, optionally looping and with /clock.

The stand-in for ``ros2 bag play`` where no ROS 2 install is available (``ros2 bag`` comes with one, not with
the PyPI wheels): ``segment.launch.py bag:=BAG bag_player:=rgbt_seg`` runs ``rgbt-seg play BAG --loop --clock``.
It publishes the stored messages as they are (:class:`~rgbt_seg_ros.ros.player.BagPlayer`).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", metavar="BAG", help="ROS 2 bag directory (sqlite3 or mcap)")
    parser.add_argument("--topics", nargs="+", metavar="TOPIC", help="play only these topics (default: all)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1)")
    parser.add_argument("-l", "--loop", action="store_true", help="play again from the start until interrupted")
    parser.add_argument("--clock", action="store_true", help="publish /clock with the bag's receive times")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before playing (discovery)")


def run(args: argparse.Namespace) -> int:
    from ..data.bags import BagError
    from ..ros.player import play_bag

    if args.rate <= 0:
        print(f"rgbt-seg play: --rate must be > 0, got {args.rate}", file=sys.stderr)
        return 2
    try:
        play_bag(args.bag, args.topics, rate=args.rate, loop=args.loop, clock=args.clock, start_delay=args.delay)
    except BagError as exc:
        print(f"rgbt-seg play: {exc}", file=sys.stderr)
        return 1
    return 0
