"""Sample bag and sample datasets: read back with independent readers and compared with the generator."""

import subprocess
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from rosbags.highlevel import AnyReader
from rosbags.image import message_to_cvimage

from conftest import script
from rgbt_seg_ros.data.bags import BagError, bag_topics, read_messages, stamp_to_ns
from rgbt_seg_ros.data.sample_bag import GT_TOPIC, RGB_TOPIC, START_NS, THERMAL_TOPIC, write_sample_bag
from rgbt_seg_ros.data.sample_dataset import read_mfnet_png, write_sample_dataset
from rgbt_seg_ros.data.synthetic import CONDITIONS, SceneGenerator

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
SMALL = dict(rgb_size=(96, 128), thermal_size=(104, 128))


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_sample_bag_reads_back(tmp_path, storage):
    bag = write_sample_bag(
        tmp_path,
        frames=12,
        fps=10,
        thermal_offset_ms=8,
        jitter_ms=1,
        storage=storage,
        seed=5,
        scene_seconds=0.5,
        **SMALL,
    )
    with AnyReader([bag]) as reader:  # rosbags' own reader, independent of rgbt_seg_ros.data.bags
        counts = Counter(c.topic for c in reader.connections for _ in range(c.msgcount))
        msgs = {}
        times = []
        for conn, t, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            times.append(t)
            msgs.setdefault(conn.topic, []).append(msg)
    assert counts == {
        RGB_TOPIC: 12,
        THERMAL_TOPIC: 12,
        GT_TOPIC: 12,
        "/rgb/camera_info": 12,
        "/thermal/camera_info": 12,
    }
    assert times == sorted(times)
    gen = SceneGenerator(seed=5, **SMALL)
    rgb_stamps = [stamp_to_ns(m.header.stamp) for m in msgs[RGB_TOPIC]]
    th_stamps = [stamp_to_ns(m.header.stamp) for m in msgs[THERMAL_TOPIC]]
    period = 100_000_000
    for i, (tr, tt) in enumerate(zip(rgb_stamps, th_stamps)):
        assert abs(tr - (START_NS + i * period)) < 6_000_000  # 1 ms jitter, 6 sigma
        assert abs(tt - tr - 8_000_000) < 9_000_000
    for i in (0, 7):
        expected = gen.sample(i // 5, CONDITIONS[(i // 5) % 4], frame=i)
        rgb_msg, th_msg, gt_msg = msgs[RGB_TOPIC][i], msgs[THERMAL_TOPIC][i], msgs[GT_TOPIC][i]
        assert rgb_msg.encoding == "bgr8" and th_msg.encoding == "mono16" and gt_msg.encoding == "mono8"
        np.testing.assert_array_equal(message_to_cvimage(rgb_msg), expected.rgb[:, :, ::-1])
        np.testing.assert_array_equal(message_to_cvimage(th_msg), expected.thermal)
        np.testing.assert_array_equal(message_to_cvimage(gt_msg), expected.labels)
        assert gt_msg.header.stamp == rgb_msg.header.stamp
    cal = yaml.safe_load((tmp_path / "calibration.yaml").read_text())
    np.testing.assert_allclose(cal["homography"], gen.homography)


def test_drop_rate_and_read_messages_errors(tmp_path):
    bag = write_sample_bag(tmp_path, frames=40, drop_rate=0.3, seed=1, **SMALL)
    n_rgb = sum(1 for m in read_messages(bag, [RGB_TOPIC]))
    assert 15 < n_rgb < 38
    assert bag_topics(bag)[THERMAL_TOPIC] == "sensor_msgs/msg/Image"
    with pytest.raises(BagError, match="has no topic /nope"):
        list(read_messages(bag, ["/nope"]))
    with pytest.raises(BagError, match="does not exist"):
        list(read_messages(tmp_path / "missing"))


def test_cli_make_sample_bag(tmp_path):
    out = tmp_path / "s"
    cmd = [script("rgbt-seg"), "make-sample-bag", str(out), "--frames", "3", "--storage", "sqlite3", "--jitter-ms", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "bag" / "metadata.yaml").exists() and (out / "calibration.yaml").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = subprocess.run(
        [script("rgbt-seg"), "make-sample-bag", str(tmp_path / "t"), "--drop-rate", "1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "drop_rate must be in [0, 1)" in bad.stderr


def _png(path):
    return np.asarray(Image.open(path))


def test_pst900_layout(tmp_path):
    write_sample_dataset(tmp_path, "pst900", count=4, size=(64, 96))
    for split, n in (("train", 3), ("test", 1)):
        names = sorted(p.name for p in (tmp_path / split / "rgb").iterdir())
        assert len(names) == n
        for sub in ("thermal", "labels"):
            assert sorted(p.name for p in (tmp_path / split / sub).iterdir()) == names
    rgb = _png(next((tmp_path / "train" / "rgb").iterdir()))
    th = _png(next((tmp_path / "train" / "thermal").iterdir()))
    lab = _png(next((tmp_path / "train" / "labels").iterdir()))
    assert rgb.shape == (64, 96, 3) and th.shape == (64, 96) and th.dtype == np.uint8 and lab.shape == (64, 96)


def test_mfnet_layout_is_four_channel_rgbt(tmp_path):
    write_sample_dataset(tmp_path, "mfnet", count=8, size=(48, 64))
    train = (tmp_path / "train.txt").read_text().split()
    test = (tmp_path / "test.txt").read_text().split()
    assert len(train) == 6 and len(test) == 2 and (tmp_path / "val.txt").exists()
    assert any(n.endswith("N") for n in train) and all(n[-1] in "DN" for n in train + test)
    name = train[1]
    img = Image.open(tmp_path / "images" / f"{name}.png")
    assert img.mode == "RGBA" and img.size == (64, 48)
    gen = SceneGenerator(seed=0, rgb_size=(48, 64), thermal_size=(48, 64))
    np.testing.assert_array_equal(np.asarray(img)[:, :, :3], gen.sample(1, CONDITIONS[1]).rgb)
    rgb, thermal = read_mfnet_png(tmp_path / "images" / f"{name}.png")
    np.testing.assert_array_equal(rgb, np.asarray(img)[:, :, :3])
    assert thermal.shape == (48, 64)


def test_fmb_and_folder_layouts(tmp_path):
    write_sample_dataset(tmp_path / "fmb", "fmb", count=4, size=(40, 56))
    for sub in ("Visible", "Infrared", "Label"):
        assert len(list((tmp_path / "fmb" / "train" / sub).glob("*.png"))) == 3
    write_sample_dataset(tmp_path / "folder", "folder", count=4, size=(40, 56))
    th = cv2.imread(str(next((tmp_path / "folder" / "thermal").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert th.dtype == np.uint16 and th.shape == (40, 56) and th.min() > 20000  # radiometric counts kept
    assert (tmp_path / "folder" / "train.txt").read_text().split() and (tmp_path / "folder" / "test.txt").exists()
    with pytest.raises(ValueError, match="unknown dataset layout"):
        write_sample_dataset(tmp_path / "x", "kitti")


@pytest.mark.skipif(not (REALDATA / "mfnet").exists(), reason="../shared/realdata is not beside this checkout")
@pytest.mark.parametrize("name", ["01234N", "01477D"])
def test_real_mfnet_four_channel_png_decodes(name):
    rgb, thermal = read_mfnet_png(REALDATA / "mfnet" / "original" / f"{name}.png")
    assert rgb.shape == (480, 640, 3) and thermal.shape == (480, 640)
    np.testing.assert_array_equal(rgb, _png(REALDATA / "mfnet" / "split" / f"{name}_rgb.png"))
    np.testing.assert_array_equal(thermal, _png(REALDATA / "mfnet" / "split" / f"{name}_thermal.png"))
    assert thermal.std() > 5  # a real thermal image, not an empty alpha channel
