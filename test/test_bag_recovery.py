"""Bags a robot leaves behind when it loses power: cut-off MCAP and sqlite3 files, missing metadata.

Replay reads every complete message up to the damage, writes its normal outputs for them and exits 3
with a sentence naming the file and the position; its labels are the full run's first N.
"""

import argparse
import json
import shutil

import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from rgbt_seg_ros.data.bags import TYPESTORE, bag_topics, read_messages, stamp_to_ns
from rgbt_seg_ros.data.sample_bag import write_sample_bag
from rgbt_seg_ros.evaluation.replay import LABELS_TOPIC
from rgbt_seg_ros.pipeline.imaging import image_to_numpy
from rgbt_seg_ros.pipeline.params import write_param_file
from rgbt_seg_ros.tools import replay as replay_tool
from rgbt_seg_ros.tools.bag_repair import run_recover, run_reindex

SIZE = dict(rgb_size=(96, 128), thermal_size=(104, 128))
SUFFIX = {"mcap": ".mcap", "sqlite3": ".db3"}


@pytest.fixture(scope="module")
def bags(tmp_path_factory, micro_checkpoint):
    """For each storage: the sample bag, a parameter file for it, and the labels of its full replay."""
    root = tmp_path_factory.mktemp("recovery")
    out = {}
    for storage in ("mcap", "sqlite3"):
        bag = write_sample_bag(root / storage, frames=16, seed=4, storage=storage, scene_seconds=0.4, **SIZE)
        params = write_param_file(
            root / f"{storage}.yaml",
            {
                "model.checkpoint": str(micro_checkpoint),
                "model.device": "cpu",
                "registration.mode": "homography",
                "registration.file": str(root / storage / "calibration.yaml"),
                "thermal.mode": "linear",
                "thermal.scale": 0.01,
                "thermal.min": 250.0,
                "thermal.max": 330.0,
            },
        )
        assert replay(bag, params, root / f"{storage}_full") == 0
        out[storage] = (bag, params, labels_of(root / f"{storage}_full"))
    return out


def replay(bag, params, out, *extra) -> int:
    parser = argparse.ArgumentParser()
    replay_tool.add_arguments(parser)
    return replay_tool.run(
        parser.parse_args([str(bag), "--params", str(params), "--out", str(out), "--no-progress", *extra])
    )


def labels_of(out) -> list[tuple[int, np.ndarray]]:
    if LABELS_TOPIC not in bag_topics(out / "segmented"):  # a valid bag that got no frame before the cut
        return []
    return [
        (stamp_to_ns(m.msg.header.stamp), image_to_numpy(m.msg).copy())
        for m in read_messages(out / "segmented", [LABELS_TOPIC])
    ]


def cut_copy(bag, dest, storage, fraction):
    shutil.copytree(bag, dest)
    data = next(dest.glob("*" + SUFFIX[storage]))
    data.write_bytes(data.read_bytes()[: int(data.stat().st_size * fraction)])
    return dest, data


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
@pytest.mark.parametrize("fraction", [0.1, 0.6, 0.99])
def test_a_bag_cut_off_by_power_loss_replays_to_the_cut(bags, tmp_path, storage, fraction, capsys):
    bag, params, full = bags[storage]
    cut, data = cut_copy(bag, tmp_path / "cut", storage, fraction)
    assert replay(cut, params, tmp_path / "out") == 3
    err = capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert str(data) in metrics["error"] and "cut off" in metrics["error"] and "complete messages" in metrics["error"]
    assert "stopped early" in err
    partial = labels_of(tmp_path / "out")  # the partial output bag is valid and readable
    assert metrics["frames_processed"] == len(partial)
    assert [s for s, _ in partial] == [s for s, _ in full[: len(partial)]]
    for (_, got), (_, want) in zip(partial, full):
        np.testing.assert_array_equal(got, want)
    if fraction >= 0.6:
        assert len(partial) >= 3
    if fraction == 0.99:
        assert len(partial) >= len(full) - 2
    assert (tmp_path / "out" / "report.md").is_file()


def test_a_bag_without_metadata_is_read_from_its_storage_file_and_reindexed(bags, tmp_path, capsys):
    bag, params, full = bags["mcap"]
    shutil.copytree(bag, tmp_path / "b")
    (tmp_path / "b" / "metadata.yaml").unlink()
    assert replay(tmp_path / "b", params, tmp_path / "out") == 0  # nothing lost: a warning, not an error
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert any("has no metadata.yaml" in w for w in metrics["warnings"])
    assert [s for s, _ in labels_of(tmp_path / "out")] == [s for s, _ in full]
    assert run_reindex(argparse.Namespace(bag=tmp_path / "b")) == 0
    with AnyReader([tmp_path / "b"], default_typestore=TYPESTORE) as reader:  # the rosbags reader accepts it
        counts = {c.topic: c.msgcount for c in reader.connections}
        assert sum(1 for _ in reader.messages()) == 80
    assert counts["/rgb/image"] == 16 and counts["/thermal/image"] == 16


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_recover_writes_a_clean_bag_of_the_complete_messages(bags, tmp_path, storage, capsys):
    bag, _, _ = bags[storage]
    cut, _ = cut_copy(bag, tmp_path / "cut", storage, 0.6)
    out = tmp_path / "clean"
    assert run_recover(argparse.Namespace(bag=cut, out=out, storage="mcap")) == 0
    printed = capsys.readouterr()
    assert "damage:" in printed.err and "complete messages" in printed.out
    n = int(printed.out.split(": ")[1].split(" ")[0])
    with AnyReader([out], default_typestore=TYPESTORE) as reader:
        assert sum(1 for _ in reader.messages()) == n >= 20
    originals = [m.raw for m in read_messages(bag)][:n]
    assert [bytes(m.raw) for m in read_messages(out)] == [bytes(r) for r in originals]


def test_an_empty_folder_is_named_and_a_failed_run_leaves_no_output_folder(bags, tmp_path, capsys):
    _, params, _ = bags["mcap"]
    (tmp_path / "empty").mkdir()
    assert replay(tmp_path / "empty", params, tmp_path / "out") == 1
    assert "is an empty folder: no metadata.yaml and no .mcap/.db3 file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    bag, _, _ = bags["mcap"]
    assert replay(bag, params, tmp_path / "out2", "--thermal-topic", "/nope") == 1
    assert "has no topic /nope" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def _zstd_copy(src, dest):
    """The MCAP file with every chunk's records zstd-compressed (as `ros2 bag record` with zstd chunks)."""
    import struct

    import zstandard

    from rgbt_seg_ros.data.bag_recovery import MCAP_MAGIC, OP_CHUNK, _Cursor, _records

    data = src.read_bytes()
    out = bytearray(MCAP_MAGIC)
    for opcode, body in _records(memoryview(data)[len(MCAP_MAGIC) :]):
        if opcode == OP_CHUNK:
            cur = _Cursor(body)
            start, end, size, crc = cur.u64(), cur.u64(), cur.u64(), cur.u32()
            cur.string()
            records = bytes(cur.take(cur.u64()))
            packed = zstandard.ZstdCompressor().compress(records)
            body = struct.pack("<QQQI", start, end, size, crc) + struct.pack("<I", 4) + b"zstd"
            body += struct.pack("<Q", len(packed)) + packed
        out += struct.pack("<BQ", opcode, len(body)) + bytes(body)
    out += MCAP_MAGIC
    dest.write_bytes(bytes(out))


def test_a_cut_off_zstd_compressed_mcap_gives_the_messages_of_its_complete_frames(bags, tmp_path):
    bag, _, _ = bags["mcap"]
    shutil.copytree(bag, tmp_path / "z")
    mcap = next((tmp_path / "z").glob("*.mcap"))
    _zstd_copy(next(bag.glob("*.mcap")), mcap)
    whole = [bytes(m.raw) for m in read_messages(tmp_path / "z")]  # uncut but footerless summary-free copy
    assert len(whole) == 80
    mcap.write_bytes(mcap.read_bytes()[: int(mcap.stat().st_size * 0.6)])
    got = []
    with pytest.raises(Exception, match="cut off"):
        for m in read_messages(tmp_path / "z"):
            got.append(bytes(m.raw))
    assert 20 <= len(got) < 80 and got == whole[: len(got)]


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_an_empty_split_file_left_by_the_power_cut_does_not_hide_the_rest(bags, tmp_path, storage):
    """rosbag2 creates the next split file before writing to it: a 0-byte file beside a whole one."""
    bag, _, _ = bags[storage]
    shutil.copytree(bag, tmp_path / "b")
    (tmp_path / "b" / "metadata.yaml").unlink()  # the recorder never wrote it
    (tmp_path / "b" / f"bag_1{SUFFIX[storage]}").write_bytes(b"")
    got = []
    with pytest.raises(Exception, match="bag_1") as err:
        for m in read_messages(tmp_path / "b"):
            got.append(m)
    assert len(got) == 80 and "damaged bag" in str(err.value)
