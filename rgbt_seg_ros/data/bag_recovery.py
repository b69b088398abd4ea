"""Reading what a damaged ROS 2 bag still holds: cut-off MCAP and sqlite3 files, missing metadata.

A robot that loses power mid-recording leaves an MCAP file without its summary and footer (or
with a record cut in half), or a sqlite3 file shorter than its header says, and sometimes no
``metadata.yaml``. The ``rosbags`` readers refuse such bags. This module reads them the way
``mcap recover`` and ``ros2 bag reindex`` do:

* MCAP: the records are walked from the start (no summary needed); every complete message is
  returned, including those at the start of a chunk that was cut off (uncompressed, zstd and
  lz4 chunks are decompressed as far as their data goes);
* sqlite3: a copy of the file whose header is made to match its real length is read in row
  order until the first page that is missing;
* the topics and types come from the file itself (MCAP channels and schemas, the sqlite3
  ``topics`` table), so a missing or wrong ``metadata.yaml`` does not matter; :func:`reindex`
  writes a new one.

Nothing here imports ROS; :mod:`rgbt_seg_ros.data.bags` uses it when a bag cannot be opened normally.
"""

from __future__ import annotations

import mmap
import shutil
import sqlite3
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MCAP_MAGIC = b"\x89MCAP0\r\n"
SQLITE_MAGIC = b"SQLite format 3\x00"
STORAGE_SUFFIXES = {".mcap": "mcap", ".db3": "sqlite3"}
# MCAP opcodes (https://mcap.dev/spec)
OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK, OP_DATA_END = 0x02, 0x03, 0x04, 0x05, 0x06, 0x0F


@dataclass
class RawMessage:
    topic: str
    msgtype: str
    log_time_ns: int
    data: bytes


@dataclass
class Damage:
    """What is wrong with a storage file, as a sentence, and how much of it was read."""

    file: Path
    text: str
    messages_read: int = 0

    def sentence(self) -> str:
        return f"{self.file} {self.text}; {self.messages_read} complete messages were read before it"


@dataclass
class RecoveredFile:
    path: Path
    storage: str
    connections: dict[str, str] = field(default_factory=dict)  # topic -> message type
    schemas: dict[str, tuple[str, str]] = field(default_factory=dict)  # message type -> (encoding, text)


def storage_files(bag: Path) -> list[Path]:
    """The storage files of a ROS 2 bag directory (or the file itself), in name order."""
    bag = Path(bag)
    if bag.is_file():
        return [bag] if bag.suffix in STORAGE_SUFFIXES else []
    return sorted(p for p in bag.iterdir() if p.suffix in STORAGE_SUFFIXES) if bag.is_dir() else []


def check_storage(path: Path) -> str | None:
    """Why ``path`` cannot be read by a normal reader (cut off, no footer, ...), or None when it looks whole."""
    size = path.stat().st_size
    if path.suffix == ".mcap":
        with open(path, "rb") as f:
            head = f.read(8)
            if head != MCAP_MAGIC:
                return f"does not start with the MCAP magic (got {head!r})"
            if size < 16:
                return f"is only {size} bytes: cut off after the MCAP header"
            f.seek(size - 8)
            if f.read(8) != MCAP_MAGIC:
                return f"has no MCAP footer: the file ends at byte {size} without its summary (cut off?)"
        return None
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return f"is not a sqlite3 database ({size} bytes)"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages = struct.unpack(">I", header[28:32])[0]
    if pages and size < pages * page_size:
        return f"is cut off: {size} bytes of the {pages * page_size} its header announces ({pages} pages)"
    return None


# ----------------------------------------------------------------------------------------- MCAP


class _Cursor:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise EOFError
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return bytes(self.take(self.u32())).decode("utf-8")


def _records(data: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """Complete (opcode, body) records of a record stream; stops at the first incomplete one."""
    cur = _Cursor(data)
    while True:
        try:
            opcode = cur.take(1)[0]
            body = cur.take(cur.u64())
        except EOFError:
            return
        yield opcode, body


def _chunk_records(body: memoryview) -> Iterator[tuple[int, memoryview]]:
    """The records of a chunk, as far as its (possibly cut-off) data goes."""
    cur = _Cursor(body)
    try:
        cur.u64(), cur.u64()  # message start / end time
        uncompressed_size = cur.u64()
        cur.u32()  # crc
        compression = cur.string()
        length = cur.u64()
    except EOFError:
        return
    compressed = cur.data[cur.pos : cur.pos + length]
    if compression == "":
        records = compressed
    elif compression == "zstd":
        import zstandard

        records = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(compressed))
    elif compression == "lz4":
        import lz4.frame

        records = lz4.frame.LZ4FrameDecompressor().decompress(bytes(compressed), max_length=uncompressed_size)
    else:
        raise ValueError(f"unsupported MCAP chunk compression '{compression}'")
    yield from _records(records)


def _mcap_messages(path: Path, info: RecoveredFile, damage: list[Damage]) -> Iterator[RawMessage]:
    if path.stat().st_size < len(MCAP_MAGIC):
        damage.append(Damage(path, f"is only {path.stat().st_size} bytes: not even the MCAP magic"))
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        yield from _walk_mcap(path, memoryview(mapped), info, damage)


def _walk_mcap(path: Path, data: memoryview, info: RecoveredFile, damage: list[Damage]) -> Iterator[RawMessage]:
    """The records of a (memory-mapped) MCAP file from its start, without its summary."""
    if bytes(data[: len(MCAP_MAGIC)]) != MCAP_MAGIC:
        damage.append(Damage(path, "does not start with the MCAP magic"))
        return
    schemas: dict[int, tuple[str, str, str]] = {}
    channels: dict[int, tuple[str, str]] = {}
    n = 0
    pos = len(MCAP_MAGIC)
    finished = False

    def handle(opcode: int, body: memoryview) -> Iterator[RawMessage]:
        nonlocal n
        cur = _Cursor(body)
        if opcode == OP_SCHEMA:
            sid, name, encoding = cur.u16(), cur.string(), cur.string()
            text = bytes(cur.take(cur.u32())).decode("utf-8", "replace")
            schemas[sid] = (name, encoding, text)
            info.schemas[name] = (encoding, text)
        elif opcode == OP_CHANNEL:
            cid, sid, topic = cur.u16(), cur.u16(), cur.string()
            msgtype = schemas.get(sid, ("?", "", ""))[0]
            channels[cid] = (topic, msgtype)
            info.connections[topic] = msgtype
        elif opcode == OP_MESSAGE:
            cid, _seq, log_time = cur.u16(), cur.u32(), cur.u64()
            cur.u64()  # publish time
            topic, msgtype = channels[cid]
            n += 1
            yield RawMessage(topic, msgtype, log_time, bytes(cur.data[cur.pos :]))

    while pos < len(data):
        if pos + 9 > len(data):
            break
        opcode, length = data[pos], struct.unpack_from("<Q", data, pos + 1)[0]
        start, end = pos + 9, pos + 9 + length
        body = data[start : min(end, len(data))]
        if opcode == OP_CHUNK:
            for inner_op, inner in _chunk_records(body):
                yield from handle(inner_op, inner)
        elif end <= len(data):
            yield from handle(opcode, body)
        if end > len(data):
            damage.append(
                Damage(path, f"is cut off at byte {len(data)}: a record at byte {pos} needs {length} bytes", n)
            )
            return
        pos = end
        if opcode in (OP_DATA_END, OP_FOOTER):
            finished = True
            break
    if not finished:
        damage.append(Damage(path, f"ends at byte {len(data)} without the MCAP data-end record and footer", n))


# ----------------------------------------------------------------------------------------- sqlite3


def _sqlite_messages(path: Path, info: RecoveredFile, damage: list[Damage]) -> Iterator[RawMessage]:
    problem = check_storage(path)
    with open(path, "rb") as f:
        if not f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC or path.stat().st_size < 100:
            # e.g. the 0-byte next split file rosbag2 creates just before the power goes
            damage.append(Damage(path, problem or "is not a sqlite3 database"))
            return
    wal = path.with_name(path.name + "-wal")
    with tempfile.TemporaryDirectory(prefix="rgbt_seg_recover_") as tmp:
        db, options = path, "mode=ro&immutable=1"
        if problem is not None or wal.exists():
            # a copy (with its write-ahead log, whose frames sqlite then applies) whose header announces
            # the pages the file really has; the recording itself is never written to
            db, options = Path(tmp) / path.name, "mode=ro"
            shutil.copyfile(path, db)
            if wal.exists():
                shutil.copyfile(wal, db.with_name(db.name + "-wal"))
            with open(db, "r+b") as f:
                header = f.read(100)
                page_size = struct.unpack(">H", header[16:18])[0]
                page_size = 65536 if page_size == 1 else page_size
                size = db.stat().st_size
                whole = size // page_size
                f.truncate(whole * page_size)
                f.seek(28)
                f.write(struct.pack(">I", whole))
        con = sqlite3.connect(f"file:{db}?{options}", uri=True)
        n = 0
        try:
            topics = {tid: (name, msgtype) for tid, name, msgtype in con.execute("SELECT id, name, type FROM topics")}
            info.connections.update(dict(topics.values()))
            for topic_id, timestamp, data in con.execute("SELECT topic_id, timestamp, data FROM messages ORDER BY id"):
                topic, msgtype = topics[topic_id]
                n += 1
                yield RawMessage(topic, msgtype, int(timestamp), bytes(data))
        except sqlite3.DatabaseError as exc:
            damage.append(Damage(path, f"{problem or 'is damaged'} (sqlite: {exc} after row {n})", n))
            return
        finally:
            con.close()
        if problem is not None:
            damage.append(Damage(path, problem + " (the rows it still holds were all read)", n))


# ----------------------------------------------------------------------------------------- public


class RecoveredBag:
    """Every complete message of a (possibly damaged) ROS 2 bag, in file and record order."""

    def __init__(self, bag: Path) -> None:
        self.bag = Path(bag)
        self.files = storage_files(self.bag)
        if not self.files:
            if self.bag.is_dir() and not any(self.bag.iterdir()):
                raise FileNotFoundError(f"bag {self.bag} is an empty folder: no metadata.yaml and no .mcap/.db3 file")
            raise FileNotFoundError(f"bag {self.bag} has no .mcap or .db3 storage file")
        self.damage: list[Damage] = []
        self.infos = [RecoveredFile(p, STORAGE_SUFFIXES[p.suffix]) for p in self.files]

    def messages(self) -> Iterator[RawMessage]:
        self.damage = []
        for info in self.infos:
            read = _mcap_messages if info.storage == "mcap" else _sqlite_messages
            yield from read(info.path, info, self.damage)

    def connections(self) -> dict[str, str]:
        """Topic -> type, read from the files (this walks the files once when they are damaged)."""
        if not any(info.connections for info in self.infos):
            for _ in self.messages():
                pass
        return {topic: t for info in self.infos for topic, t in info.connections.items()}

    def schemas(self) -> dict[str, tuple[str, str]]:
        return {name: s for info in self.infos for name, s in info.schemas.items()}


def reindex(bag: Path) -> Path:
    """Write ``metadata.yaml`` for a ROS 2 bag directory from its storage files, as ``ros2 bag reindex`` does.

    An existing metadata.yaml is kept as ``metadata.yaml.bak``. Counts are those of the complete
    messages; a damaged file stays damaged (``rgbt-seg recover`` writes a clean copy).
    """
    bag = Path(bag)
    reader = RecoveredBag(bag)
    counts: dict[str, int] = {}
    per_file: dict[Path, list[int]] = {}
    types = {}
    for info in reader.infos:
        times: list[int] = []
        read = _mcap_messages if info.storage == "mcap" else _sqlite_messages
        for m in read(info.path, info, []):
            counts[m.topic] = counts.get(m.topic, 0) + 1
            times.append(m.log_time_ns)
        per_file[info.path] = times
        types.update(info.connections)
    storages = {info.storage for info in reader.infos}
    if len(storages) != 1:
        raise ValueError(f"bag {bag} mixes storage formats: {', '.join(sorted(storages))}")
    all_times = [t for times in per_file.values() for t in times]
    start = min(all_times, default=0)
    duration = (max(all_times) - start) if all_times else 0

    def span(times: list[int]) -> dict:
        first = min(times, default=0)
        return {
            "starting_time": {"nanoseconds_since_epoch": first},
            "duration": {"nanoseconds": (max(times) - first) if times else 0},
        }

    info = {
        "version": 9,
        "storage_identifier": storages.pop(),
        "duration": {"nanoseconds": duration},
        "starting_time": {"nanoseconds_since_epoch": start},
        "message_count": len(all_times),
        "topics_with_message_count": [
            {
                "topic_metadata": {
                    "name": topic,
                    "type": msgtype,
                    "serialization_format": "cdr",
                    "offered_qos_profiles": [],
                    "type_description_hash": "",
                },
                "message_count": counts.get(topic, 0),
            }
            for topic, msgtype in types.items()
        ],
        "compression_format": "",
        "compression_mode": "",
        "relative_file_paths": [p.name for p in reader.files],
        "files": [{"path": p.name, "message_count": len(t), **span(t)} for p, t in per_file.items()],
        "custom_data": None,
        "ros_distro": "rgbt_seg_ros reindex",
    }
    meta = bag / "metadata.yaml"
    if meta.exists():
        shutil.copyfile(meta, bag / "metadata.yaml.bak")
    meta.write_text(yaml.safe_dump({"rosbag2_bagfile_information": info}, sort_keys=False))
    return meta
