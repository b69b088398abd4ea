"""A small ROS 2 bag player: publishes a bag's messages over DDS with their original timing.

``ros2 bag play`` cannot be installed from PyPI (it comes with a ROS 2 install), so the demo and the live benchmarks
use this. It publishes the stored CDR bytes as they are (rclpy ``publish`` accepts
serialised bytes), paced by the bag's receive times (scaled by ``rate``). ROS 2 bags only
(sqlite3 and mcap). On a robot, use ``ros2 bag play`` instead.

rclpy is imported lazily: this is DDS tooling for the CLI, not part of the frame pipeline.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path

from ..data.bags import TYPESTORE, BagError


def _message_class(msgtype: str):
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


class BagPlayer:
    """Publish ``topics`` of a ROS 2 bag from ``node`` with the recorded pacing."""

    def __init__(self, node, bag: str | Path, topics: list[str] | None = None, rate: float = 1.0, qos=10) -> None:
        from rosbags.highlevel import AnyReader

        self.node = node
        self.bag = Path(bag)
        if not self.bag.exists():
            raise BagError(f"bag {self.bag} does not exist")
        if rate <= 0:
            raise ValueError(f"playback rate must be > 0, got {rate}")
        self.rate = rate
        self._reader = AnyReader([self.bag], default_typestore=TYPESTORE)
        self._reader.open()
        if not self._reader.is2:
            self._reader.close()
            raise BagError(f"bag {self.bag} is a ROS 1 bag; the built-in player plays ROS 2 bags (use rgbt-seg replay)")
        available = {c.topic: c.msgtype for c in self._reader.connections}
        wanted = topics if topics is not None else list(available)
        missing = [t for t in wanted if t not in available]
        if missing:
            self._reader.close()
            raise BagError(f"bag {self.bag} has no topic {', '.join(missing)}; topics: {', '.join(sorted(available))}")
        self.connections = [c for c in self._reader.connections if c.topic in wanted]
        self.publishers = {
            c.topic: node.create_publisher(_message_class(c.msgtype), c.topic, qos) for c in self.connections
        }
        self.published = 0

    def play(self, spin: Callable[[float], None], on_publish: Callable[[str, bytes, float], None] | None = None) -> int:
        """Publish everything; ``spin(seconds)`` keeps the caller's executor running while waiting.

        ``on_publish(topic, raw, wall_time)`` is called after each message is sent.
        """
        start_wall = None
        start_bag = None
        try:
            for conn, t_ns, raw in self._reader.messages(connections=self.connections):
                if start_wall is None:
                    start_wall, start_bag = time.monotonic(), t_ns
                due = start_wall + (t_ns - start_bag) / 1e9 / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    spin(delay)
                data = bytes(raw)
                self.publishers[conn.topic].publish(data)
                self.published += 1
                if on_publish is not None:
                    on_publish(conn.topic, data, time.monotonic())
        finally:
            self._reader.close()
        return self.published
