"""The fault and bad-input suite, unit level: what each bad input does to the node's path, without DDS.

Every case goes through the objects the node and replay share (imaging -> sync -> FramePipeline
-> message build, checkpoint loading, parameters, replay). Cases already covered elsewhere are
not repeated here; the README's fault table names the test of each case.
"""

import re
import shutil

import numpy as np
import pytest
from sensor_msgs.msg import Image

from rgbt_seg_ros.pipeline.frame_flow import (
    FramePipeline,
    LatestSlot,
    PartnerWatch,
    normalizer_from_params,
    registrar_from_params,
)
from rgbt_seg_ros.pipeline.imaging import (
    ENCODINGS,
    ImageEncodingError,
    ThermalNormalizer,
    fill_image_msg,
    rgb_from_msg,
    thermal_from_msg,
)
from rgbt_seg_ros.pipeline.params import defaults
from rgbt_seg_ros.pipeline.registration import ThermalRegistrar
from rgbt_seg_ros.pipeline.segmenter import Segmenter
from rgbt_seg_ros.pipeline.sync import ApproximateTimePairer

H, W = 61, 83  # odd sizes on purpose
BASE = 1_700_000_000_000_000_000
MS = 1_000_000


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny tensors


@pytest.fixture(scope="module")
def segmenter(micro_checkpoint):
    return Segmenter.from_checkpoint(micro_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def pipeline(segmenter):
    return FramePipeline(segmenter, ThermalNormalizer("fixed", min=27000, max=31000), ThermalRegistrar.identity())


def scene(h=H, w=W, seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    thermal = rng.integers(27000, 31000, (h, w), dtype=np.uint16)
    return rgb, thermal


def raw_msg(height, width, encoding, step, data: bytes, is_bigendian=0):
    msg = Image()
    msg.height, msg.width, msg.encoding, msg.step, msg.is_bigendian = height, width, encoding, step, is_bigendian
    msg.data = data
    return msg


def run_frame(pipeline, rgb_msg, thermal_msg):
    """The node's path for one frame: convert, pair, process, build the output messages."""
    rgb = rgb_from_msg(rgb_msg, max_pixels=16_000_000)
    thermal = thermal_from_msg(thermal_msg, max_pixels=16_000_000)
    pairer = ApproximateTimePairer()
    pairs = pairer.add_rgb(BASE, rgb) + pairer.add_thermal(BASE, thermal)
    assert len(pairs) == 1
    out = pipeline.process(pairs[0].rgb, pairs[0].thermal, outputs={"labels", "overlay", "thermal_registered"})
    fill_image_msg(Image(), out.labels, "mono8")
    fill_image_msg(Image(), out.overlay, "rgb8")
    assert out.labels.shape == rgb.shape[:2] and out.overlay.shape == (*rgb.shape[:2], 3)
    assert np.isfinite(out.confidence_grid).all()
    return out


# ----------------------------------------------------------------------------- encodings


def colour_messages(rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    return {
        "rgb8": fill_image_msg(Image(), rgb, "rgb8"),
        "bgr8": fill_image_msg(Image(), np.ascontiguousarray(rgb[:, :, ::-1]), "bgr8"),
        "rgba8": fill_image_msg(Image(), rgba, "rgba8"),
        "bgra8": fill_image_msg(Image(), np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]]), "bgra8"),
        "8UC3": fill_image_msg(Image(), rgb, "8UC3"),
    }


def test_every_colour_encoding_gives_the_same_segmentation(pipeline):
    rgb, thermal = scene()
    th_msg = fill_image_msg(Image(), thermal, "mono16")
    labels = {enc: run_frame(pipeline, msg, th_msg).labels for enc, msg in colour_messages(rgb).items()}
    assert set(labels) == {e for e, (_, c) in ENCODINGS.items() if c >= 3}
    for enc, lab in labels.items():
        np.testing.assert_array_equal(lab, labels["rgb8"], err_msg=enc)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1", "mono16", "16UC1", "32FC1"])
def test_every_thermal_encoding_is_segmented(segmenter, encoding):
    rgb, thermal16 = scene()
    arr = {
        "mono8": (thermal16 >> 8).astype(np.uint8),
        "8UC1": (thermal16 >> 8).astype(np.uint8),
        "mono16": thermal16,
        "16UC1": thermal16,
        "32FC1": thermal16.astype(np.float32) / 100.0,  # Kelvin
    }[encoding]
    pipe = FramePipeline(segmenter, ThermalNormalizer("percentile"), ThermalRegistrar.identity())
    out = run_frame(pipe, fill_image_msg(Image(), rgb, "rgb8"), fill_image_msg(Image(), arr, encoding))
    assert out.valid.all() and out.valid_grid.all()


@pytest.mark.parametrize("encoding", ["yuv422", "bayer_rggb8", "16SC1", "64FC1", "nv12", ""])
def test_unsupported_encodings_are_refused_with_their_name(encoding):
    msg = raw_msg(4, 4, encoding, 8, bytes(32))
    with pytest.raises(ImageEncodingError, match=f"unsupported image encoding '{encoding}'"):
        rgb_from_msg(msg)
    with pytest.raises(ImageEncodingError, match="unsupported"):
        thermal_from_msg(msg)


def test_encodings_on_the_wrong_camera_are_refused():
    with pytest.raises(ImageEncodingError, match="'mono16' is not accepted on this input; expected one of: rgb8"):
        rgb_from_msg(fill_image_msg(Image(), np.zeros((4, 4), np.uint16), "mono16"))
    with pytest.raises(ImageEncodingError, match="'rgb8' is not accepted on this input; expected one of: mono8"):
        thermal_from_msg(fill_image_msg(Image(), np.zeros((4, 4, 3), np.uint8), "rgb8"))


# ----------------------------------------------------------------------------- layouts


def test_odd_widths_and_odd_padded_steps_give_the_unpadded_result(pipeline):
    rgb, thermal = scene()
    reference = run_frame(pipeline, fill_image_msg(Image(), rgb, "rgb8"), fill_image_msg(Image(), thermal, "mono16"))
    rgb_step, th_step = W * 3 + 5, W * 2 + 3  # odd padding: the 16-bit rows are not 2-byte aligned
    rgb_rows = np.zeros((H, rgb_step), np.uint8)
    rgb_rows[:, : W * 3] = rgb.reshape(H, -1)
    th_rows = np.full((H, th_step), 0xAB, np.uint8)
    th_rows[:, : W * 2] = thermal.view(np.uint8).reshape(H, -1)
    out = run_frame(
        pipeline,
        raw_msg(H, W, "rgb8", rgb_step, rgb_rows.tobytes()),
        raw_msg(H, W, "mono16", th_step, th_rows.tobytes()),
    )
    np.testing.assert_array_equal(out.labels, reference.labels)
    np.testing.assert_array_equal(out.overlay, reference.overlay)


def test_data_longer_than_step_times_height_is_ignored_beyond_the_image(pipeline):
    rgb, thermal = scene()
    reference = run_frame(pipeline, fill_image_msg(Image(), rgb, "rgb8"), fill_image_msg(Image(), thermal, "mono16"))
    rgb_msg = raw_msg(H, W, "rgb8", W * 3, rgb.tobytes() + b"\xff" * 1000)
    out = run_frame(pipeline, rgb_msg, fill_image_msg(Image(), thermal, "mono16"))
    np.testing.assert_array_equal(out.labels, reference.labels)


@pytest.mark.parametrize("encoding", ["mono16", "16UC1", "32FC1"])
def test_big_endian_thermal_gives_the_little_endian_result(pipeline, segmenter, encoding):
    rgb, thermal = scene()
    if encoding == "32FC1":
        thermal = thermal.astype(np.float32)
        pipe = FramePipeline(segmenter, ThermalNormalizer("fixed", min=27000, max=31000), ThermalRegistrar.identity())
    else:
        pipe = pipeline
    rgb_msg = fill_image_msg(Image(), rgb, "rgb8")
    little = run_frame(pipe, rgb_msg, fill_image_msg(Image(), thermal, encoding))
    big = raw_msg(H, W, encoding, thermal.strides[0], thermal.astype(thermal.dtype.newbyteorder(">")).tobytes(), 1)
    out = run_frame(pipe, rgb_msg, big)
    np.testing.assert_array_equal(out.labels, little.labels)
    np.testing.assert_array_equal(out.thermal_registered, little.thermal_registered)


def test_smallest_images_and_too_thin_thermal(pipeline):
    rgb, thermal = scene(2, 3)
    run_frame(pipeline, fill_image_msg(Image(), rgb, "rgb8"), fill_image_msg(Image(), thermal, "mono16"))
    rgb1, _ = scene(1, 1)
    out = pipeline.process(rgb1, None)  # a 1x1 RGB frame in RGB-only mode
    assert out.labels.shape == (1, 1)
    # a thermal image one pixel high cannot be warped: a ValueError the node counts as a frame error
    with pytest.raises(ValueError, match=r"got shape \(1, 40\)"):
        pipeline.process(scene(4, 40)[0], np.zeros((1, 40), np.uint16))


def test_absurd_header_sizes_are_refused_before_any_allocation():
    huge = raw_msg(200_000, 200_000, "rgb8", 600_000, bytes(16))  # claims 120 GB
    with pytest.raises(ImageEncodingError, match="exceeds the limit of 16.0 megapixels"):
        rgb_from_msg(huge, max_pixels=16_000_000)
    with pytest.raises(ImageEncodingError, match="has 16 bytes, expected step\\*height"):
        rgb_from_msg(huge)  # without a limit the short buffer is still caught, again without allocating
    with pytest.raises(ImageEncodingError, match="zero size"):
        thermal_from_msg(raw_msg(0, 640, "mono16", 1280, b""))


# ----------------------------------------------------------------------------- NaN / inf thermal


def test_nan_and_inf_thermal_pixels_become_invalid_and_outputs_stay_finite(pipeline, segmenter):
    rgb, thermal = scene()
    kelvin = thermal.astype(np.float32) / 100.0
    kelvin[10:20, 10:30] = np.nan
    kelvin[30, :] = np.inf
    kelvin[40, :5] = -np.inf
    pipe = FramePipeline(segmenter, ThermalNormalizer("percentile"), ThermalRegistrar.identity())
    out = run_frame(pipe, fill_image_msg(Image(), rgb, "rgb8"), fill_image_msg(Image(), kelvin, "32FC1"))
    bad = ~np.isfinite(kelvin)
    assert not out.valid[bad].any() and out.valid[~bad].all()
    assert np.isfinite(out.thermal_registered).all() and (out.thermal_registered[bad] == 0).all()
    # what the model was given: grid pixels over the NaN block are invalid, the rest of the grid valid
    gh, gw = out.valid_grid.shape
    assert not out.valid_grid[round(15 * gh / H), round(20 * gw / W)]
    assert out.valid_grid[round(50 * gh / H), round(60 * gw / W)] and out.valid_grid.mean() > 0.7


def test_all_nan_thermal_is_refused_and_segmented_as_rgb_only_by_the_pipeline(pipeline, segmenter):
    # the node and replay refuse such messages at conversion (counted as no_finite_pixel) ...
    rgb, _ = scene()
    nan = np.full((H, W), np.nan, np.float32)
    with pytest.raises(ImageEncodingError, match="no finite pixel") as err:
        thermal_from_msg(fill_image_msg(Image(), nan, "32FC1"))
    assert err.value.reason == "no_finite_pixel"
    # ... and the pipeline, given one anyway, treats it as no thermal at all
    pipe = FramePipeline(segmenter, ThermalNormalizer("percentile"), ThermalRegistrar.identity())
    out = pipe.process(rgb, nan)
    assert not out.valid.any() and not out.valid_grid.any()
    np.testing.assert_array_equal(out.labels, pipe.process(rgb, None).labels)


def test_homography_registration_with_nan_thermal_marks_the_warped_pixels_invalid(segmenter):
    rgb, thermal = scene(96, 128)
    calib = {"mode": "homography", "homography": np.eye(3).tolist(), "thermal_size": [128, 96], "rgb_size": [128, 96]}
    pipe = FramePipeline(segmenter, ThermalNormalizer("percentile"), ThermalRegistrar.from_dict(calib))
    kelvin = thermal.astype(np.float32)
    kelvin[:, :40] = np.nan
    out = pipe.process(rgb, kelvin)
    assert not out.valid[:, :39].any() and out.valid[:, 41:].all()


# ----------------------------------------------------------------------------- stamps, stalls, flapping, bursts


def test_a_stalled_rgb_camera_bounds_the_thermal_queue_and_pairing_resumes():
    p = ApproximateTimePairer(queue_size=5, slop=0.01, max_wait=0.1)
    t = 0
    for i in range(10):  # both cameras
        t = BASE + i * 100 * MS
        assert len(p.add_rgb(t, i, now_ns=t) + p.add_thermal(t, i, now_ns=t)) == 1
    for i in range(10, 60):  # RGB stalls for 5 s, thermal keeps coming
        t = BASE + i * 100 * MS
        p.add_thermal(t, i, now_ns=t)
        p.poll(t + 50 * MS)
    s = p.stats
    assert s.queued_thermal <= 5 and s.dropped_unmatched_thermal + s.dropped_overflow_thermal >= 45
    got = []
    for i in range(60, 65):  # RGB is back
        t = BASE + i * 100 * MS
        got += p.add_rgb(t, i, now_ns=t) + p.add_thermal(t, i, now_ns=t)
    assert [x.rgb for x in got] == [60, 61, 62, 63, 64] and p.stats.resets == 0


def test_a_stalled_or_missing_thermal_camera_switches_to_rgb_only_after_the_timeout():
    w = PartnerWatch(timeout=1.0)
    assert not w.lost(0.0) and not w.lost(0.5) and not w.lost(0.9) and w.lost(1.1)  # thermal never arrived
    w.partner_seen(1.2)
    assert not w.lost(1.3) and not w.lost(1.9) and not w.lost(2.15) and w.lost(2.25)  # stalled
    w.partner_seen(2.3)
    assert not w.lost(2.4)  # back


def test_a_flapping_thermal_camera_switches_every_time_and_pairs_whenever_both_run():
    w = PartnerWatch(timeout=0.3)
    p = ApproximateTimePairer(queue_size=5, slop=0.01, max_wait=0.1)
    modes, pairs, t_s = [], 0, 0.0
    for cycle in range(6):
        for k in range(20):  # 1 s per half cycle at 20 Hz; thermal only in the first half
            i = cycle * 20 + k
            t_s = i * 0.05
            stamp = BASE + i * 50 * MS
            now = stamp
            if k < 10:
                w.partner_seen(t_s)
                pairs += len(p.add_thermal(stamp, i, now_ns=now))
            if w.lost(t_s):
                modes.append("rgb_only")
                p.poll(now)
            else:
                modes.append("pair")
                pairs += len(p.add_rgb(stamp, i, now_ns=now))
    switches = sum(a != b for a, b in zip(modes, modes[1:]))
    assert switches == 11  # into and out of rgb_only in every cycle (the last one ends in rgb_only)
    assert pairs >= 6 * 10 - 6 and p.stats.resets == 0
    assert p.stats.queued_rgb <= 5 and p.stats.queued_thermal <= 5


def _drive_watch(events, timeout=0.5):
    """Feed (t, camera) arrivals to a PartnerWatch as the node does; the mode of every RGB frame."""
    w = PartnerWatch(timeout=timeout)
    modes = []
    for t, camera in events:
        if camera == "thermal":
            w.partner_seen(t)
        else:
            modes.append("rgb_only" if w.lost(t) else "pair")
    return modes


def _stream(t0, t1, rate=10.0, cameras=("rgb", "thermal")):
    n = int(round((t1 - t0) * rate))
    return [(t0 + i / rate + (0.008 if c == "thermal" else 0.0), c) for i in range(n) for c in cameras]


def test_a_pause_of_both_cameras_never_switches_to_rgb_only():
    # driver restart / bag paused for longer than thermal_timeout: both stop, then both resume together
    events = _stream(0.0, 2.0) + _stream(5.0, 7.0)
    modes = _drive_watch(events)
    assert modes == ["pair"] * len(modes)  # the first RGB frame after the pause is paired normally


def test_rgb_only_starts_only_after_rgb_kept_arriving_for_the_timeout_without_thermal():
    events = _stream(0.0, 2.0) + _stream(2.0, 4.0, cameras=("rgb",)) + _stream(4.0, 5.0)
    modes = _drive_watch(events)
    switch = modes.index("rgb_only")
    assert 0.5 <= (switch - 20) / 10.0 <= 0.65  # 0.5 s of RGB without thermal, not earlier
    # thermal back at 4.008 s: the RGB frame of 4.0 s is still RGB-only, every later one is paired
    assert modes[41:] == ["pair"] * 9


def test_a_joint_pause_after_thermal_died_first_resumes_paired():
    # thermal stops at 2 s, RGB goes on (rgb_only from 2.5 s), both stop at 3 s, both resume at 6 s
    events = _stream(0.0, 2.0) + _stream(2.0, 3.0, cameras=("rgb",)) + _stream(6.0, 7.0)
    modes = _drive_watch(events)
    assert "rgb_only" in modes[20:30]
    assert modes[30:] == ["pair"] * 10


def test_a_thermal_only_stream_and_alternating_flaps_switch_as_expected():
    thermal_only = _stream(0.0, 2.0, cameras=("thermal",)) + _stream(2.0, 3.0)
    assert _drive_watch(thermal_only) == ["pair"] * 10
    # thermal flaps: 1 s on, 1 s off, five times, RGB always on
    flaps = []
    for k in range(5):
        flaps += _stream(2 * k, 2 * k + 1) + _stream(2 * k + 1, 2 * k + 2, cameras=("rgb",))
    modes = _drive_watch(sorted(flaps))
    switches = sum(a != b for a, b in zip(modes, modes[1:]))
    assert switches == 9  # into rgb_only in every off half, back to pairs in every on half


def test_a_burst_of_arrivals_keeps_only_the_newest_pair():
    p = ApproximateTimePairer(queue_size=5, slop=0.01, max_wait=0.1)
    slot, superseded = LatestSlot(), 0
    for i in range(40):  # 40 RGB frames delivered at once, then 40 thermal frames
        p.add_rgb(BASE + i * 33 * MS, i, now_ns=BASE)
    pairs = []
    for i in range(40):
        pairs += p.add_thermal(BASE + i * 33 * MS, i, now_ns=BASE)
    pairs += p.flush()
    for pair in pairs:
        superseded += slot.put(pair)
    assert p.stats.queued_rgb == 0 and p.stats.dropped_overflow_rgb + p.stats.dropped_unmatched_rgb >= 35
    assert superseded == len(pairs) - 1
    newest = slot.get(timeout=0)
    assert newest.rgb == max(x.rgb for x in pairs) and slot.get(timeout=0) is None


def test_stamps_before_1970_count_as_unfilled():
    p = ApproximateTimePairer(on_warning=lambda _: None)
    assert p.add_rgb(-5 * MS, "r") == [] and p.add_thermal(-5 * MS, "t") == []
    assert (p.stats.rejected_rgb, p.stats.rejected_thermal) == (1, 1)


# ----------------------------------------------------------------------------- checkpoints


def corrupt(src, dst, how):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    if how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "garbage":
        f.write_bytes(b"\x00not a safetensors file" * 64)
    elif how == "empty":
        f.write_bytes(b"")
    elif how == "config not yaml":
        (dst / "config.yaml").write_text("format: [unclosed\n  backend: {")
    elif how == "no tensors file":
        f.unlink()
    return dst


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "config not yaml", "no tensors file"])
def test_a_corrupt_checkpoint_fails_to_load_and_nothing_is_built(micro_checkpoint, tmp_path, how):
    bad = corrupt(micro_checkpoint, tmp_path / "bad", how)
    with pytest.raises(Exception) as info:  # the node catches every load error (test_node_faults)
        Segmenter.from_checkpoint(bad, device="cpu")
    assert str(info.value)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "config not yaml"])
def test_a_corrupt_checkpoint_error_names_the_file(micro_checkpoint, tmp_path, how):
    bad = corrupt(micro_checkpoint, tmp_path / "bad", how)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        Segmenter.from_checkpoint(bad, device="cpu")


# ----------------------------------------------------------------------------- parameters


def test_parameters_that_are_each_in_range_but_inconsistent_are_refused():
    p = defaults()
    with pytest.raises(ValueError, match="0 <= p_low < p_high <= 100"):
        normalizer_from_params({**p, "thermal.p_low": 99.0, "thermal.p_high": 1.0})
    with pytest.raises(ValueError, match="max > min"):
        normalizer_from_params({**p, "thermal.mode": "fixed", "thermal.min": 5.0, "thermal.max": 5.0})
    with pytest.raises(ValueError, match="needs registration.file"):
        registrar_from_params({**p, "registration.mode": "homography", "registration.file": ""})


def test_a_missing_calibration_file_is_named(tmp_path):
    p = {**defaults(), "registration.mode": "homography", "registration.file": str(tmp_path / "nope.yaml")}
    with pytest.raises(Exception, match="nope.yaml"):
        registrar_from_params(p)


def test_a_palette_shorter_than_the_class_list_is_refused(segmenter):
    pipe = FramePipeline(segmenter, ThermalNormalizer(), ThermalRegistrar.identity())
    with pytest.raises(ValueError, match="palette has 2 colours but the model has 8 classes"):
        pipe.set_palette([0xFF0000, 0x00FF00])


# ----------------------------------------------------------------------------- bags


# Bags cut off mid-file (power loss) are read to the cut: test/test_bag_recovery.py


def test_a_camera_slower_than_the_timeout_still_switches_to_rgb_only():
    # RGB at 0.5 Hz with thermal_timeout 1 s: every RGB gap exceeds the timeout, yet RGB keeps arriving
    slow = [(2.0 * i, "rgb") for i in range(3)] + [(2.0 * i - 0.01, "thermal") for i in range(3)]
    slow += [(2.0 * i, "rgb") for i in range(3, 8)]  # thermal's last frame at 3.99 s
    modes = _drive_watch(sorted(slow), timeout=1.0)
    assert modes[:3] == ["pair"] * 3 and modes[-3:] == ["rgb_only"] * 3


def test_a_timeout_below_the_frame_period_still_detects_a_dead_thermal_camera():
    events = _stream(0.0, 1.0) + _stream(1.0, 3.0, cameras=("rgb",))
    modes = _drive_watch(events, timeout=0.05)  # the smallest allowed timeout, 10 Hz cameras
    assert modes[-5:] == ["rgb_only"] * 5
