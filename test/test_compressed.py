"""imaging: sensor_msgs/CompressedImage <-> numpy (jpeg/png as image_transport writes them), and every refusal."""

import array
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage as RclpyCompressedImage

from rgbt_seg_ros.data.bags import TYPESTORE, make_header
from rgbt_seg_ros.pipeline import imaging
from rgbt_seg_ros.pipeline.imaging import (
    COLOR_ENCODINGS,
    THERMAL_ENCODINGS,
    ImageEncodingError,
    compressed_image_size,
    compressed_to_numpy,
    fill_compressed_msg,
    numpy_to_compressed_bytes,
    to_rgb,
)


class Msg:
    """A plain object with the CompressedImage fields (what compressed_to_numpy duck-types on)."""

    def __init__(self, format, data):  # noqa: A002 - the message field is called format
        self.format, self.data = format, data


def smooth_bgr(h=48, w=64, seed=0):
    """A photo-like (smooth) colour image: JPEG keeps it within a few grey levels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def random_mono16(h=40, w=56, seed=1):
    return np.random.default_rng(seed).integers(0, 65535, (h, w), endpoint=True).astype(np.uint16)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def crafted_png(width, height, depth=8, color=2, idat=b"\x78\x9c\x03\x00\x00\x00\x00\x01") -> bytes:
    """A PNG whose IHDR claims any size; the pixel data (IDAT) is a few bytes only."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def crafted_jpeg(width, height, sof=0xC0) -> bytes:
    """SOI, a JFIF APP0 segment, fill bytes, a frame header claiming any size, EOI; no scan data."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    components = b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    frame = bytes([0xFF, sof]) + struct.pack(">HBHHB", 8 + len(components), 8, height, width, 3) + components
    return b"\xff\xd8" + app0 + b"\xff\xff" + frame + b"\xff\xd9"


# ---------------------------------------------------------------- round trips


def test_bgr8_jpeg_round_trip_within_tolerance():
    bgr = smooth_bgr()
    payload, fmt = numpy_to_compressed_bytes(bgr, "jpeg")
    assert fmt == "bgr8; jpeg compressed bgr8"
    assert payload[:2] == b"\xff\xd8"
    out, encoding = compressed_to_numpy(Msg(fmt, payload))
    assert encoding == "bgr8" and out.dtype == np.uint8 and out.shape == bgr.shape
    diff = np.abs(out.astype(np.int16) - bgr.astype(np.int16))
    assert diff.mean() < 4.0 and diff.max() < 64  # a swapped channel order would be ~80 on average


@pytest.mark.parametrize(
    "arr, encoding, fmt_string",
    [
        (smooth_bgr(seed=3), "bgr8", "bgr8; png compressed bgr8"),
        (np.random.default_rng(4).integers(0, 256, (9, 13), dtype=np.uint8), "mono8", "mono8; png compressed mono8"),
        (random_mono16(), "mono16", "mono16; png compressed mono16"),
    ],
)
def test_png_round_trips_are_exact(arr, encoding, fmt_string):
    payload, fmt = numpy_to_compressed_bytes(arr, "png")
    assert fmt == fmt_string
    out, decoded = compressed_to_numpy(Msg(fmt, payload))
    assert decoded == encoding and out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_16bit_png_keeps_values_above_255():
    thermal = np.array([[0, 255, 256, 1000], [29000, 30000, 65534, 65535]], np.uint16)  # counts, Kelvin*100
    payload, fmt = numpy_to_compressed_bytes(thermal, "png", "16UC1")
    assert fmt == "16UC1; png compressed mono16"
    out, encoding = compressed_to_numpy(Msg(fmt, payload), expected=THERMAL_ENCODINGS)
    assert encoding == "16UC1" and out.dtype == np.uint16  # the original name is kept for single channel
    np.testing.assert_array_equal(out, thermal)
    assert int(out.max()) == 65535


def test_rgb8_original_comes_back_bgr8_and_to_rgb_restores_it():
    rgb = smooth_bgr(seed=5)[:, :, ::-1].copy()
    payload, fmt = numpy_to_compressed_bytes(rgb, "png", "rgb8")
    assert fmt == "rgb8; png compressed bgr8"  # image_transport converts colour to bgr8 before encoding
    out, encoding = compressed_to_numpy(Msg(fmt, payload), expected=COLOR_ENCODINGS)
    assert encoding == "bgr8"  # decoded order, whatever the original encoding was
    np.testing.assert_array_equal(to_rgb(out, encoding), rgb)


def test_rgba_input_drops_alpha_and_4_channel_png_decodes_as_bgra8():
    bgr = smooth_bgr(seed=6)
    rgba = np.dstack([bgr[:, :, ::-1], np.full(bgr.shape[:2], 9, np.uint8)])
    payload, fmt = numpy_to_compressed_bytes(rgba, "png", "rgba8")
    assert fmt == "rgba8; png compressed bgr8"
    np.testing.assert_array_equal(compressed_to_numpy(Msg(fmt, payload))[0], bgr)
    # a 4-channel PNG written by someone else (not image_transport) keeps its alpha
    bgra = np.dstack([bgr, np.arange(bgr.shape[0] * bgr.shape[1], dtype=np.uint8).reshape(bgr.shape[:2])])
    ok, buf = cv2.imencode(".png", bgra)
    out, encoding = compressed_to_numpy(Msg("png", buf.tobytes()))
    assert encoding == "bgra8"
    np.testing.assert_array_equal(out, bgra)
    np.testing.assert_array_equal(to_rgb(out, encoding), bgr[:, :, ::-1])


@pytest.mark.parametrize(
    "fmt_string, arr, encoding",
    [
        ("jpeg", smooth_bgr(), "bgr8"),
        ("JPG", smooth_bgr(), "bgr8"),
        ("png", smooth_bgr(), "bgr8"),
        ("rgb8; jpeg compressed bgr8", smooth_bgr(), "bgr8"),
        ("bgr8; jpeg compressed bgr8", smooth_bgr(), "bgr8"),
        ("mono8; png compressed mono8", smooth_bgr()[:, :, 1].copy(), "mono8"),
        ("mono16; png compressed mono16", random_mono16(), "mono16"),
        ("16UC1; png compressed mono16", random_mono16(), "16UC1"),
        ("8UC1; jpeg compressed mono8", smooth_bgr()[:, :, 0].copy(), "8UC1"),
        ("png", random_mono16(), "mono16"),
    ],
)
def test_format_strings_written_by_image_transport_and_cv_bridge(fmt_string, arr, encoding):
    ext = ".jpg" if "jp" in fmt_string.lower() else ".png"
    ok, buf = cv2.imencode(ext, arr)
    out, decoded = compressed_to_numpy(Msg(fmt_string, buf.tobytes()))
    assert decoded == encoding and out.shape == arr.shape and out.dtype == arr.dtype
    if ext == ".png":
        np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "array", "list", "memoryview", "ndarray"])
def test_data_containers(kind):
    thermal = random_mono16(12, 10, seed=7)
    payload, fmt = numpy_to_compressed_bytes(thermal, "png")
    data = {
        "bytes": payload,
        "bytearray": bytearray(payload),
        "array": array.array("B", payload),
        "list": list(payload),
        "memoryview": memoryview(payload),
        "ndarray": np.frombuffer(payload, np.uint8),
    }[kind]
    out, encoding = compressed_to_numpy(Msg(fmt, data))
    assert encoding == "mono16"
    np.testing.assert_array_equal(out, thermal)


def test_rclpy_compressed_image_message():
    bgr = smooth_bgr(seed=8)
    msg = fill_compressed_msg(RclpyCompressedImage(), bgr, "jpeg", jpeg_quality=90)
    assert msg.format == "bgr8; jpeg compressed bgr8"
    assert isinstance(msg.data, array.array)  # rclpy stores uint8[] as array('B'); we assigned bytes
    out, encoding = compressed_to_numpy(msg, expected=COLOR_ENCODINGS, max_pixels=10**6)
    assert encoding == "bgr8" and out.shape == bgr.shape
    assert np.abs(out.astype(np.int16) - bgr).mean() < 4.0
    assert compressed_image_size(msg) == (bgr.shape[1], bgr.shape[0])


def test_rosbags_compressed_image_message_and_cdr_round_trip():
    thermal = random_mono16(24, 32, seed=9)
    CompressedImage = TYPESTORE.types["sensor_msgs/msg/CompressedImage"]
    msg = CompressedImage(
        header=make_header(1_700_000_000_250_000_000, "thermal"), format="", data=np.zeros(0, np.uint8)
    )
    fill_compressed_msg(msg, thermal, "png", as_numpy=True)
    assert msg.format == "mono16; png compressed mono16" and msg.data.dtype == np.uint8
    raw = TYPESTORE.serialize_cdr(msg, "sensor_msgs/msg/CompressedImage")
    from_bag = TYPESTORE.deserialize_cdr(raw, "sensor_msgs/msg/CompressedImage")
    out, encoding = compressed_to_numpy(from_bag, expected=THERMAL_ENCODINGS)
    assert encoding == "mono16" and from_bag.header.frame_id == "thermal"
    np.testing.assert_array_equal(out, thermal)
    # the same CDR bytes read by rclpy (what replay publishes) decode to the same pixels
    live = deserialize_message(bytes(raw), RclpyCompressedImage)
    assert live.header.stamp.sec == 1_700_000_000 and live.header.stamp.nanosec == 250_000_000
    np.testing.assert_array_equal(compressed_to_numpy(live)[0], thermal)


def test_progressive_jpeg_and_segments_before_the_frame_header():
    bgr = smooth_bgr(40, 72, seed=10)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    payload = buf.tobytes()
    msg = Msg("jpeg", payload)
    assert compressed_image_size(msg) == (72, 40)  # SOF2
    assert compressed_to_numpy(msg)[0].shape == (40, 72, 3)
    # an APP1 (Exif-like) segment full of 0xFF bytes and fill bytes before the next marker
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 300) + b"\xff" * 300
    msg.data = payload[:2] + app1 + b"\xff\xff\xff" + payload[2:]
    assert compressed_image_size(msg) == (72, 40)
    assert compressed_to_numpy(msg)[0].shape == (40, 72, 3)


# ---------------------------------------------------------------- refusals


def test_max_pixels_is_enforced_from_the_header_without_decoding(monkeypatch):
    def no_decode(*args):
        raise AssertionError("cv2.imdecode must not run for an image above max_pixels")

    monkeypatch.setattr(imaging.cv2, "imdecode", no_decode)
    for fmt, payload in (("png", crafted_png(9000, 9000)), ("bgr8; jpeg compressed bgr8", crafted_jpeg(9000, 9000))):
        assert len(payload) < 100
        start = time.perf_counter()
        with pytest.raises(ImageEncodingError) as info:
            compressed_to_numpy(Msg(fmt, payload), max_pixels=4_000_000)
        assert time.perf_counter() - start < 0.05
        assert str(info.value) == (
            f"compressed image '{fmt}' is 9000x9000 = 81.0 megapixels, above the limit of 4.0 megapixels; not decoded"
        )
    # progressive frame header (SOF2) too
    with pytest.raises(ImageEncodingError, match="9000x9000 = 81.0 megapixels, above the limit"):
        compressed_to_numpy(Msg("jpeg", crafted_jpeg(9000, 9000, sof=0xC2)), max_pixels=4_000_000)


def test_max_pixels_on_a_real_image_and_below_the_limit():
    payload, fmt = numpy_to_compressed_bytes(smooth_bgr(48, 64), "jpeg")
    with pytest.raises(ImageEncodingError, match=r"is 64x48 = 0.0 megapixels, above the limit of 0.0 megapixels"):
        compressed_to_numpy(Msg(fmt, payload), max_pixels=64 * 48 - 1)
    assert compressed_to_numpy(Msg(fmt, payload), max_pixels=64 * 48)[0].shape == (48, 64, 3)


def _real(fmt="png"):
    return numpy_to_compressed_bytes(smooth_bgr(64, 80, seed=11), fmt)[0]


ERROR_CASES = [
    ("png", b"", "compressed image 'png' has no data (0 bytes)"),
    ("jpeg", [], "compressed image 'jpeg' has no data (0 bytes)"),
    ("tiff", b"II*\x00", "compressed image format 'tiff' is not supported; expected jpeg or png"),
    ("", b"\xff\xd8", "compressed image format '' is not supported; expected jpeg or png"),
    ("bgr8; webp compressed bgr8", b"RIFF", "format 'bgr8; webp compressed bgr8' is not supported"),
    (
        "16UC1; compressedDepth png",
        crafted_png(4, 4),
        "is image_transport's compressedDepth, which is not supported",
    ),
    ("16UC1; compressedDepth", b"\x00" * 16, "compressedDepth, which is not supported"),
    ("jpeg", _real("png"), "data is not a JPEG: it starts with 89 50 4e 47 0d 0a 1a 0a (PNG)"),
    ("png", _real("jpeg"), "data is not a PNG: it starts with ff d8"),
    ("png", b"GIF89a\x01\x00", "(neither JPEG nor PNG)"),
    ("png", _real("png")[:20], "is truncated: 20 bytes end before the PNG IHDR header"),
    ("jpeg", _real("jpeg")[:10], "is truncated: 10 bytes end before the JPEG frame header (SOF)"),
    (
        "png",
        _real("png")[: len(_real("png")) // 2],
        "cannot be decoded by OpenCV: the data ends without the PNG end",
    ),
    ("jpeg", _real("jpeg")[:-400], "cannot be decoded by OpenCV: the data ends without the JPEG end marker"),
    (
        "png",
        crafted_png(8, 8, idat=b"not zlib at all"),
        "(8x8, 72 bytes) cannot be decoded by OpenCV: the data is corrupt",
    ),
    ("jpeg", crafted_jpeg(8, 8), "(8x8, 43 bytes) cannot be decoded by OpenCV: the data is corrupt"),
    ("png", crafted_png(0, 8), "header gives a zero size (0x8)"),
    ("jpeg", crafted_jpeg(16, 0), "header gives a zero size (16x0)"),
    ("jpeg", b"\xff\xd8\x00\x10", "not a valid JPEG: no marker at byte 2"),
    ("jpeg", b"\xff\xd8\xff\xda\x00\x08", "marker FFDA comes before any frame header"),
    ("jpeg", b"\xff\xd8\xff\xe0\x00\x01", "segment FFE0 at byte 2 has length 1"),
    ("png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"tEXt", b"x" * 20), "the first chunk is b'tEXt', not IHDR"),
    ("png", crafted_png(5, 5, depth=16, color=2), "is a 16-bit RGB PNG (5x5), which is not supported"),
    ("png", [137, 80, 300], "data is not a sequence of bytes (0..255)"),
    ("png", "\x89PNG", "data of type str is not bytes-like"),
]


@pytest.mark.parametrize("fmt, data, fragment", ERROR_CASES, ids=[case[2][:48] for case in ERROR_CASES])
def test_errors_name_the_format_and_the_problem(fmt, data, fragment):
    with pytest.raises(ImageEncodingError) as info:
        compressed_to_numpy(Msg(fmt, data))
    assert fragment in str(info.value)


def test_16bit_colour_png_is_refused_before_decoding(monkeypatch):
    ok, buf = cv2.imencode(".png", (smooth_bgr(8, 8).astype(np.uint16) * 257))
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda *a: pytest.fail("decoded a 16-bit colour PNG"))
    with pytest.raises(ImageEncodingError, match="16-bit RGB PNG \\(8x8\\), which is not supported; expected 8-bit"):
        compressed_to_numpy(Msg("bgr16; png compressed bgr16", buf.tobytes()))


def test_expected_encodings():
    payload, fmt = numpy_to_compressed_bytes(random_mono16(8, 8), "png")
    with pytest.raises(ImageEncodingError) as info:
        compressed_to_numpy(Msg(fmt, payload), expected=COLOR_ENCODINGS)
    assert str(info.value) == (
        "compressed image 'mono16; png compressed mono16' decodes to encoding 'mono16', which is not accepted on "
        "this input; expected one of: rgb8, bgr8, rgba8, bgra8, 8UC3"
    )
    payload, fmt = numpy_to_compressed_bytes(smooth_bgr(), "jpeg")
    with pytest.raises(ImageEncodingError, match="decodes to encoding 'bgr8', which is not accepted on this input"):
        compressed_to_numpy(Msg(fmt, payload), expected=THERMAL_ENCODINGS)


@pytest.mark.parametrize(
    "arr, fmt, encoding, fragment",
    [
        (random_mono16(4, 4), "jpeg", None, "cannot compress mono16 as jpeg: JPEG holds 8 bits; use png"),
        (np.zeros((4, 4), np.float32), "png", "32FC1", "cannot compress 32FC1 (float) images"),
        (np.zeros((4, 4), np.float32), "png", None, "dtype float32 cannot be compressed"),
        (np.zeros((4, 4, 3), np.uint8), "webp", None, "cannot compress to format 'webp'; expected one of: jpeg, png"),
        (np.zeros((4, 4), np.uint8), "png", "rgb8", "cannot be compressed as rgb8: expected (H, W, 3)"),
        (np.zeros((4, 4), np.uint8), "png", "mono16", "dtype uint8 cannot be compressed as mono16: expected uint16"),
        (np.zeros((4, 4), np.uint8), "png", "yuv422", "cannot compress unsupported encoding 'yuv422'"),
        (np.zeros((0, 4), np.uint8), "png", None, "cannot compress an empty image"),
    ],
)
def test_compress_refusals(arr, fmt, encoding, fragment):
    with pytest.raises(ImageEncodingError) as info:
        numpy_to_compressed_bytes(arr, fmt, encoding)
    assert fragment in str(info.value)


def test_errors_are_value_errors_for_callers_that_catch_broadly():
    with pytest.raises(ValueError):
        compressed_to_numpy(Msg("png", b""))
