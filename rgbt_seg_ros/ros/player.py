"""A small ROS 2 bag player: publishes a bag's messages over DDS with their original timing.

``ros2 bag play`` cannot be installed from PyPI (it comes with a ROS 2 install), so the demo, the live
benchmarks and ``rgbt-seg play`` (``segment.launch.py bag_player:=rgbt_seg``) use this. It publishes the
stored CDR bytes as they are (rclpy ``publish`` accepts serialised bytes), paced by the bag's receive
times (scaled by ``rate``), and with ``clock`` publishes ``/clock`` (rosgraph_msgs/Clock) at each
message's receive time, as ``ros2 bag play --clock`` does, so nodes with ``use_sim_time`` follow the
bag. ROS 2 bags only (sqlite3 and mcap). On a robot, ``ros2 bag play`` does the same and more.

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

    def __init__(
        self,
        node,
        bag: str | Path,
        topics: list[str] | None = None,
        rate: float = 1.0,
        qos=10,
        clock: bool = False,
    ) -> None:
        self.node = node
        self.bag = Path(bag)
        if not self.bag.exists():
            raise BagError(f"bag {self.bag} does not exist")
        if rate <= 0:
            raise ValueError(f"playback rate must be > 0, got {rate}")
        self.rate = rate
        reader = self._open()
        try:
            if not reader.is2:
                raise BagError(
                    f"bag {self.bag} is a ROS 1 bag; the built-in player plays ROS 2 bags (use rgbt-seg replay)"
                )
            available = {c.topic: c.msgtype for c in reader.connections}
        finally:
            reader.close()
        wanted = topics if topics is not None else list(available)
        missing = [t for t in wanted if t not in available]
        if missing:
            raise BagError(f"bag {self.bag} has no topic {', '.join(missing)}; topics: {', '.join(sorted(available))}")
        self.topics = [t for t in available if t in wanted]
        self.publishers = {t: node.create_publisher(_message_class(available[t]), t, qos) for t in self.topics}
        self.clock_publisher = None
        if clock:
            from rosgraph_msgs.msg import Clock

            self._clock_msg = Clock
            self.clock_publisher = node.create_publisher(Clock, "/clock", 10)
        self.published = 0

    def _open(self):
        from rosbags.highlevel import AnyReader

        reader = AnyReader([self.bag], default_typestore=TYPESTORE)
        reader.open()
        return reader

    def play(self, spin: Callable[[float], None], on_publish: Callable[[str, bytes, float], None] | None = None) -> int:
        """Publish everything once; ``spin(seconds)`` keeps the caller's executor running while waiting.

        ``on_publish(topic, raw, wall_time)`` is called after each message is sent. Returns the number of
        messages published so far (all passes)."""
        start_wall = None
        start_bag = None
        reader = self._open()
        try:
            connections = [c for c in reader.connections if c.topic in self.publishers]
            for conn, t_ns, raw in reader.messages(connections=connections):
                if start_wall is None:
                    start_wall, start_bag = time.monotonic(), t_ns
                due = start_wall + (t_ns - start_bag) / 1e9 / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    spin(delay)
                if self.clock_publisher is not None:
                    msg = self._clock_msg()
                    msg.clock.sec, msg.clock.nanosec = divmod(t_ns, 1_000_000_000)
                    self.clock_publisher.publish(msg)
                data = bytes(raw)
                self.publishers[conn.topic].publish(data)
                self.published += 1
                if on_publish is not None:
                    on_publish(conn.topic, data, time.monotonic())
        finally:
            reader.close()
        return self.published


def play_bag(
    bag: str | Path,
    topics: list[str] | None = None,
    rate: float = 1.0,
    loop: bool = False,
    clock: bool = False,
    start_delay: float = 0.0,
    log=print,
) -> int:
    """``rgbt-seg play``: play a bag over DDS from a node of its own until it ends (or, with ``loop``, until
    SIGINT / SIGTERM); returns the number of messages published."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    rclpy.init()
    node = rclpy.create_node("rgbt_seg_player")
    executor = SingleThreadedExecutor()
    executor.add_node(node)

    def spin(seconds: float) -> None:
        end = time.monotonic() + seconds
        while rclpy.ok() and time.monotonic() < end:
            executor.spin_once(timeout_sec=min(0.05, max(end - time.monotonic(), 0.0)))

    player = None
    try:
        player = BagPlayer(node, bag, topics, rate=rate, clock=clock)
        log(
            f"playing {player.bag} ({', '.join(player.topics)}) at {rate:g}x"
            f"{', looping' if loop else ''}{', publishing /clock' if clock else ''}"
        )
        spin(start_delay)
        passes = 0
        while rclpy.ok():
            player.play(spin)
            passes += 1
            if not loop:
                break
        log(f"published {player.published} messages ({passes} pass{'es' if passes != 1 else ''})")
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return player.published if player is not None else 0
