"""Reading and writing rosbags with the `rosbags` library (no ROS install needed).

Reads ROS 2 bags (sqlite3 and mcap, any format version rosbags knows) and ROS 1
bags through ``rosbags.highlevel.AnyReader``; writes ROS 2 bags (format version 9)
with the kilted typestore. Message objects are rosbags dataclasses with the same
field names as the ROS messages, so ``imaging.image_to_numpy`` reads them as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from ..pipeline.imaging import fill_image_msg
from .bag_recovery import RecoveredBag, check_storage, storage_files

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}

IMAGE_TYPE = "sensor_msgs/msg/Image"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"


class BagError(RuntimeError):
    """A bag that cannot be read as asked; the text names the bag and what was wrong."""


@dataclass
class BagMessage:
    topic: str
    msgtype: str
    log_time_ns: int  # receive (record) time
    msg: object  # deserialised rosbags dataclass
    raw: bytes | memoryview | None = None  # the stored CDR bytes (ROS 2 bags; None for ROS 1)


def damage_of(path: str | Path) -> str | None:
    """Why a ROS 2 bag must be read by :mod:`~rgbt_seg_ros.data.bag_recovery` (None: the normal reader will do)."""
    path = Path(path)
    if not path.exists():
        return None
    files = storage_files(path)
    if path.is_dir() and not files:
        return None  # not a ROS 2 storage layout we can recover; the normal reader names the problem
    problems = [f"{f} {why}" for f in files if (why := check_storage(f)) is not None]
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        problems.insert(0, f"bag {path} has no metadata.yaml (rgbt-seg reindex {path} rebuilds it)")
    return "; ".join(problems) or None


def _recovered(path: Path) -> RecoveredBag:
    try:
        return RecoveredBag(path)
    except FileNotFoundError as exc:
        raise BagError(str(exc)) from exc


def _deserialize(raw: bytes, msgtype: str, schemas: dict[str, tuple[str, str]]):
    if msgtype not in TYPESTORE.types and msgtype in schemas and schemas[msgtype][0] == "ros2msg":
        TYPESTORE.register(get_types_from_msg(schemas[msgtype][1], msgtype))
    return TYPESTORE.deserialize_cdr(raw, msgtype)


def _read_recovered(path: Path, topics: list[str] | None) -> Iterator[BagMessage]:
    """Every complete message of a damaged bag, then BagError naming the damage (if the data is damaged)."""
    recovered = _recovered(path)
    if topics is not None:
        available = recovered.connections()
        missing = [t for t in topics if t not in available]
        if missing:
            listing = ", ".join(f"{t} ({m})" for t, m in sorted(available.items())) or "none"
            raise BagError(f"bag {path} has no topic {', '.join(missing)}; topics in the bag: {listing}")
    position = 0
    for m in recovered.messages():
        if topics is not None and m.topic not in topics:
            continue
        try:
            msg = _deserialize(m.data, m.msgtype, recovered.schemas())
        except Exception as exc:
            raise BagError(f"bag {path} is unreadable after message {position} (topic {m.topic}): {exc}") from exc
        position += 1
        yield BagMessage(topic=m.topic, msgtype=m.msgtype, log_time_ns=m.log_time_ns, msg=msg, raw=m.data)
    if recovered.damage:
        raise BagError("damaged bag: " + "; ".join(d.sentence() for d in recovered.damage))


def _open(path: Path) -> AnyReader:
    if not path.exists():
        raise BagError(f"bag {path} does not exist")
    if path.is_dir() and not any(path.iterdir()):
        raise BagError(f"bag {path} is an empty folder: no metadata.yaml and no .mcap/.db3 file")
    try:
        reader = AnyReader([path], default_typestore=TYPESTORE)
        reader.open()
    except Exception as exc:  # rosbags raises several reader-specific errors
        raise BagError(f"cannot open bag {path}: {exc}") from exc
    return reader


def bag_topics(path: str | Path) -> dict[str, str]:
    """Topic -> message type of every connection in the bag."""
    if damage_of(path):
        return _recovered(Path(path)).connections()
    try:
        reader = _open(Path(path))
    except BagError:
        if not storage_files(Path(path)):
            raise
        return _recovered(Path(path)).connections()  # e.g. an MCAP summary that does not match its data
    try:
        return {c.topic: c.msgtype for c in reader.connections}
    finally:
        reader.close()


def message_counts(path: str | Path) -> dict[str, int]:
    """Topic -> number of messages, as the bag's index gives it; empty when it cannot say (a damaged bag).
    For progress bars: nothing else should rest on it."""
    try:
        with AnyReader([Path(path)], default_typestore=TYPESTORE) as reader:
            return {c.topic: c.msgcount for c in reader.connections}
    except Exception:  # rosbags raises several reader-specific errors
        return {}


def read_messages(path: str | Path, topics: list[str] | None = None) -> Iterator[BagMessage]:
    """Deserialised messages in bag (receive-time) order.

    Raises :class:`BagError` naming the topic when a requested topic is not in the
    bag, and naming the topic and message position when the bag is truncated or a
    message cannot be decoded. Messages yielded before the error stay valid. A ROS 2 bag
    cut off mid-file (power loss) or without metadata.yaml is read by
    :mod:`~rgbt_seg_ros.data.bag_recovery`: every complete message, then a BagError naming the damage.
    """
    path = Path(path)
    if damage_of(path):
        yield from _read_recovered(path, topics)
        return
    try:
        reader = _open(path)
    except BagError:
        if not storage_files(path):
            raise
        yield from _read_recovered(path, topics)  # e.g. an MCAP summary that does not match its data
        return
    try:
        available = {c.topic: c.msgtype for c in reader.connections}
        if topics is not None:
            missing = [t for t in topics if t not in available]
            if missing:
                listing = ", ".join(f"{t} ({m})" for t, m in sorted(available.items())) or "none"
                raise BagError(f"bag {path} has no topic {', '.join(missing)}; topics in the bag: {listing}")
            connections = [c for c in reader.connections if c.topic in topics]
        else:
            connections = list(reader.connections)
        position = 0
        current = "?"
        is_ros2 = bool(reader.is2)
        iterator = reader.messages(connections=connections)
        while True:
            try:
                conn, timestamp, raw = next(iterator)
                current = conn.topic
                msg = reader.deserialize(raw, conn.msgtype)
            except StopIteration:
                break
            except Exception as exc:
                raise BagError(
                    f"bag {path} is unreadable after message {position} (last topic {current}): {exc}"
                ) from exc
            position += 1
            yield BagMessage(
                topic=conn.topic,
                msgtype=conn.msgtype,
                log_time_ns=int(timestamp),
                msg=msg,
                raw=raw if is_ros2 else None,
            )
    finally:
        reader.close()


def stamp_to_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def make_header(stamp_ns: int, frame_id: str):
    Time = TYPESTORE.types["builtin_interfaces/msg/Time"]
    Header = TYPESTORE.types["std_msgs/msg/Header"]
    return Header(
        stamp=Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000)), frame_id=frame_id
    )


def make_image(arr: np.ndarray, encoding: str, stamp_ns: int, frame_id: str):
    """A rosbags sensor_msgs/Image from an ndarray."""
    Image = TYPESTORE.types[IMAGE_TYPE]
    msg = Image(
        header=make_header(stamp_ns, frame_id),
        height=0,
        width=0,
        encoding="",
        is_bigendian=0,
        step=0,
        data=np.zeros(0, np.uint8),
    )
    return fill_image_msg(msg, arr, encoding, as_numpy=True)


def make_camera_info(width: int, height: int, k: np.ndarray, stamp_ns: int, frame_id: str, d: np.ndarray | None = None):
    """A rosbags sensor_msgs/CameraInfo (plumb_bob) for a pinhole camera."""
    CameraInfo = TYPESTORE.types[CAMERA_INFO_TYPE]
    RegionOfInterest = TYPESTORE.types["sensor_msgs/msg/RegionOfInterest"]
    k = np.asarray(k, np.float64).reshape(3, 3)
    p = np.zeros((3, 4), np.float64)
    p[:, :3] = k
    return CameraInfo(
        header=make_header(stamp_ns, frame_id),
        height=int(height),
        width=int(width),
        distortion_model="plumb_bob",
        d=np.zeros(5, np.float64) if d is None else np.asarray(d, np.float64),
        k=k.reshape(-1),
        r=np.eye(3).reshape(-1),
        p=p.reshape(-1),
        binning_x=0,
        binning_y=0,
        roi=RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
    )


class BagWriter:
    """A ROS 2 bag (format 9) being written; connections are added on first use of a topic.

    Use as a context manager: the bag's metadata is written on close, also when an
    exception ends the block, so everything written so far stays readable.
    """

    def __init__(self, path: str | Path, storage: str = "mcap") -> None:
        if storage not in STORAGES:
            raise ValueError(f"unknown bag storage '{storage}'; expected one of {sorted(STORAGES)}")
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f"output bag {self.path} already exists; remove it or choose another path")
        self._writer = Writer(self.path, version=9, storage_plugin=STORAGES[storage])
        self._connections: dict[str, object] = {}
        self.count = 0

    def __enter__(self) -> BagWriter:
        self._writer.open()
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()

    def write(self, topic: str, msg, log_time_ns: int) -> None:
        msgtype = msg.__msgtype__
        self.write_raw(topic, msgtype, TYPESTORE.serialize_cdr(msg, msgtype), log_time_ns)

    def write_raw(self, topic: str, msgtype: str, rawdata: bytes | memoryview, log_time_ns: int) -> None:
        """Copy an already-serialised CDR message (e.g. input topics passed through by replay)."""
        conn = self._connections.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=TYPESTORE)
            self._connections[topic] = conn
        self._writer.write(conn, int(log_time_ns), rawdata)
        self.count += 1
