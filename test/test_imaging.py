"""imaging: Image <-> numpy for every encoding, padding, endianness, errors; thermal normalisation."""

import sys

import numpy as np
import pytest
from rosbags.image import message_to_cvimage
from sensor_msgs.msg import Image as RclpyImage

from rgbt_seg_ros.data.bags import make_image
from rgbt_seg_ros.pipeline.imaging import (
    ENCODINGS,
    ImageEncodingError,
    ThermalNormalizer,
    encode_image,
    fill_image_msg,
    image_to_numpy,
    to_rgb,
)


def random_array(encoding, h=7, w=5, seed=0):
    dtype, channels = ENCODINGS[encoding]
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    if dtype == np.float32:
        return rng.normal(300, 20, shape).astype(np.float32)
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


class FieldsMsg:
    """A plain object with the Image fields (what image_to_numpy duck-types on)."""

    def __init__(self, height, width, encoding, step, data, is_bigendian=0):
        self.height, self.width, self.encoding = height, width, encoding
        self.step, self.data, self.is_bigendian = step, data, is_bigendian


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_round_trip_rclpy_message(encoding):
    arr = random_array(encoding)
    msg = fill_image_msg(RclpyImage(), arr, encoding)
    assert msg.step == arr.shape[1] * ENCODINGS[encoding][1] * arr.dtype.itemsize
    out = image_to_numpy(msg)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_round_trip_rosbags_message_and_agreement_with_rosbags_image(encoding):
    arr = random_array(encoding, h=6, w=9, seed=1)
    msg = make_image(arr, encoding, stamp_ns=1_500_000_000_123, frame_id="cam")
    assert msg.header.stamp.sec == 1500 and msg.header.stamp.nanosec == 123
    out = image_to_numpy(msg)
    np.testing.assert_array_equal(out, arr)
    reference = message_to_cvimage(msg)
    np.testing.assert_array_equal(out, reference.reshape(out.shape))


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_padded_rows_are_skipped(encoding):
    arr = random_array(encoding, h=4, w=3, seed=2)
    enc = encode_image(arr, encoding)
    pad = 5  # odd padding: not a multiple of 2 or 4 bytes
    rows = np.frombuffer(enc.data, np.uint8).reshape(enc.height, enc.step)
    padded = np.concatenate([rows, np.full((enc.height, pad), 0xAB, np.uint8)], axis=1)
    msg = FieldsMsg(enc.height, enc.width, encoding, enc.step + pad, padded.tobytes())
    np.testing.assert_array_equal(image_to_numpy(msg), arr)


@pytest.mark.parametrize("encoding", ["mono16", "16UC1", "32FC1"])
def test_big_endian_multibyte_data(encoding):
    arr = random_array(encoding, h=3, w=4, seed=3)
    big = arr.astype(arr.dtype.newbyteorder(">"))
    msg = FieldsMsg(3, 4, encoding, 4 * arr.dtype.itemsize, big.tobytes(), is_bigendian=1)
    out = image_to_numpy(msg)
    assert out.dtype.byteorder in ("=", "|") or out.dtype.byteorder == ("<" if sys.byteorder == "little" else ">")
    np.testing.assert_array_equal(out, arr)
    # the same bytes read as little-endian would be different values: the flag matters
    msg.is_bigendian = 0
    assert not np.array_equal(image_to_numpy(msg), arr)


def test_read_is_zero_copy_for_native_layout():
    arr = random_array("mono16", h=8, w=8)
    enc = encode_image(arr, "mono16")
    buf = bytearray(enc.data)
    msg = FieldsMsg(8, 8, "mono16", enc.step, buf)
    out = image_to_numpy(msg)
    buf[0] ^= 0xFF  # mutate the message buffer: the array sees it
    assert out[0, 0] != arr[0, 0]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(height=4, width=4, encoding="yuv422", step=8, data=bytes(32)), "unsupported image encoding 'yuv422'"),
        (dict(height=0, width=4, encoding="mono8", step=4, data=b""), "zero size"),
        (dict(height=4, width=4, encoding="rgb8", step=12, data=bytes(47)), "has 47 bytes, expected step*height"),
        (dict(height=4, width=4, encoding="mono16", step=6, data=bytes(24)), "step 6 is smaller"),
    ],
)
def test_errors_name_the_problem(kwargs, fragment):
    with pytest.raises(ImageEncodingError, match=fragment.replace("*", r"\*").replace("(", r"\(")):
        image_to_numpy(FieldsMsg(**kwargs))


def test_expected_encodings_and_size_limit():
    msg = fill_image_msg(RclpyImage(), random_array("mono16"), "mono16")
    with pytest.raises(ImageEncodingError, match="not accepted on this input; expected one of: rgb8"):
        image_to_numpy(msg, expected=("rgb8", "bgr8"))
    with pytest.raises(ImageEncodingError, match="exceeds the limit"):
        image_to_numpy(msg, max_pixels=10)


def test_encode_rejects_wrong_shape_and_dtype():
    with pytest.raises(ImageEncodingError, match=r"expected \(H, W, 3\)"):
        encode_image(np.zeros((4, 4), np.uint8), "rgb8")
    with pytest.raises(ImageEncodingError, match="expected uint16"):
        encode_image(np.zeros((4, 4), np.uint8), "mono16")


def test_to_rgb_channel_orders():
    rgb = random_array("rgb8")
    np.testing.assert_array_equal(to_rgb(rgb[:, :, ::-1], "bgr8"), rgb)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(to_rgb(rgba, "rgba8"), rgb)
    np.testing.assert_array_equal(to_rgb(rgba[:, :, [2, 1, 0, 3]], "bgra8"), rgb)


# ---------------------------------------------------------------- thermal normalisation


def test_fixed_and_linear_modes():
    raw = np.array([[28000, 30000], [32000, 36000]], np.uint16)  # Kelvin * 100
    out, finite = ThermalNormalizer("fixed", min=28000, max=32000).normalize(raw)
    assert finite is None and out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.5], [1.0, 1.0]])  # clipped above max
    lin, _ = ThermalNormalizer("linear", scale=0.01, offset=0.0, min=280.0, max=320.0).normalize(raw)
    np.testing.assert_allclose(lin, [[0.0, 0.5], [1.0, 1.0]], atol=1e-6)


def test_percentile_is_robust_to_hot_outliers():
    rng = np.random.default_rng(0)
    raw = rng.normal(29000, 200, (64, 64)).astype(np.uint16)
    raw[0, 0] = 65535  # a dead pixel / the sun
    out, _ = ThermalNormalizer("percentile", p_low=1, p_high=99).normalize(raw)
    assert 0.35 < float(np.median(out)) < 0.65  # the scene keeps its contrast despite the outlier
    flat, _ = ThermalNormalizer("percentile").normalize(np.full((8, 8), 123, np.uint16))
    assert np.isfinite(flat).all()


def test_nan_and_inf_are_zeroed_and_reported():
    raw = np.array([[300.0, np.nan], [np.inf, 310.0]], np.float32)
    out, finite = ThermalNormalizer("fixed", min=290, max=320).normalize(raw)
    np.testing.assert_array_equal(finite, [[True, False], [False, True]])
    assert np.isfinite(out).all() and out[0, 1] == 0 and out[1, 0] == 0
    np.testing.assert_allclose(out[0, 0], 10 / 30, rtol=1e-6)


def test_passthrough_and_bad_configuration():
    out, _ = ThermalNormalizer("passthrough").normalize(np.array([[0, 255]], np.uint8))
    np.testing.assert_allclose(out, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="needs 8-bit"):
        ThermalNormalizer("passthrough").normalize(np.zeros((2, 2), np.uint16))
    with pytest.raises(ValueError, match="unknown"):
        ThermalNormalizer("agc")
    with pytest.raises(ValueError, match="max > min"):
        ThermalNormalizer("fixed", min=5, max=5)
