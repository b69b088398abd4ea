"""The sample bag: synthetic RGB-thermal camera streams with ground truth, as a rig would record them.

Topics (all stamped in the sensor's own clock, recorded at a later receive time); the image
topics are the names ``segment_node`` subscribes to when started without remapping:
  /rgb/image            sensor_msgs/Image bgr8, 640x480 by default
  /thermal/image        sensor_msgs/Image mono16 radiometric counts (Kelvin * 100), 640x512
  /rgb/camera_info      sensor_msgs/CameraInfo
  /thermal/camera_info  sensor_msgs/CameraInfo
  /rgbt/labels_gt       sensor_msgs/Image mono8 class ids in the RGB frame, with the RGB image's stamp

The thermal camera is triggered ``thermal_offset_ms`` after the RGB camera; both
stamps carry ``jitter_ms`` of Gaussian jitter; each camera independently drops a
frame with probability ``drop_rate``; receive times add a transport delay (longer
for thermal, as with USB thermal cores), so messages interleave realistically.
Scenes change every second and cycle through day, night, fog and glare.

Two faults a rig has in the field can be recorded on purpose: ``thermal_shift_px`` moves the
thermal camera after calibration (the written calibration stays the rig's original one, the
images come from a rig whose registered thermal sits that many RGB pixels off, in the sense of
:mod:`rgbt_seg_ros.pipeline.registration_health`), and ``rgb_gap`` silences the RGB camera (its image,
camera_info and ground truth) for a span of seconds while thermal keeps running.

The rig's own node parameters (its exact homography, the thermal scaling of its Kelvin*100
counts) are written into the bag directory as ``rgbt_seg_params.yaml``
(:data:`~rgbt_seg_ros.pipeline.params.BAG_PARAMS`):
``rgbt-seg replay``, ``rgbt-seg demo`` and the launch file's ``bag:=`` use it when no other
parameter file is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from ..pipeline.params import BAG_PARAMS, write_param_file
from .bags import BagWriter, make_camera_info, make_image
from .synthetic import CONDITIONS, SceneGenerator

RGB_TOPIC = "/rgb/image"
THERMAL_TOPIC = "/thermal/image"
RGB_INFO_TOPIC = "/rgb/camera_info"
THERMAL_INFO_TOPIC = "/thermal/camera_info"
GT_TOPIC = "/rgbt/labels_gt"
#: beside the bag: {RGB stamp (ns, as text): condition} for every RGB frame written (day/night/fog/glare)
CONDITIONS_FILE = "conditions.json"
RGB_FRAME = "rgb_camera_optical_frame"
THERMAL_FRAME = "thermal_camera_optical_frame"
START_NS = 1_700_000_000_000_000_000  # a realistic epoch stamp (2023-11-14)


def rgb_intrinsics(width: int, height: int) -> np.ndarray:
    f = 0.78 * width  # ~65 degrees horizontal field of view
    return np.array([[f, 0, width / 2.0], [0, f, height / 2.0], [0, 0, 1]])


def write_sample_bag(
    out_dir: str | Path,
    frames: int = 40,
    fps: float = 10.0,
    thermal_offset_ms: float = 8.0,
    jitter_ms: float = 2.0,
    drop_rate: float = 0.0,
    storage: str = "mcap",
    seed: int = 0,
    rgb_size: tuple[int, int] = (480, 640),
    thermal_size: tuple[int, int] = (512, 640),
    scene_seconds: float = 1.0,
    thermal_shift_px: tuple[float, float] = (0.0, 0.0),
    rgb_gap: tuple[float, float] | None = None,
) -> Path:
    """Write ``out_dir/bag`` (ROS 2 bag, format 9, with ``rgbt_seg_params.yaml`` inside) and
    ``out_dir/calibration.yaml`` and ``out_dir/conditions.json`` (each RGB frame's condition, by stamp);
    return the bag path."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if jitter_ms < 0:
        raise ValueError(f"jitter_ms must be >= 0, got {jitter_ms}")
    if rgb_gap is not None and not 0 <= rgb_gap[0] < rgb_gap[1]:
        raise ValueError(f"rgb_gap must be (start, end) seconds with 0 <= start < end, got {rgb_gap}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bag_path = out_dir / "bag"
    calibrated = SceneGenerator(seed=seed, rgb_size=rgb_size, thermal_size=thermal_size)
    gen = calibrated.thermal_moved(*thermal_shift_px)  # the rig as it is now (the calibration is the original)
    rng = np.random.default_rng(seed + 7919)
    period_ns = int(round(1e9 / fps))
    frames_per_scene = max(1, int(round(scene_seconds * fps)))
    (h, w), (ht, wt) = gen.rgb_size, gen.thermal_size
    k_rgb = rgb_intrinsics(w, h)
    # Thermal intrinsics consistent with the rig's homography at the image centre (informative).
    k_t = np.array(
        [
            [k_rgb[0, 0] / 0.985 * (wt / 640.0), 0, wt / 2.0],
            [0, k_rgb[0, 0] / 0.985 * (wt / 640.0), ht / 2.0],
            [0, 0, 1],
        ]
    )

    events: list[tuple[int, int, str, object]] = []  # (receive ns, order, topic, msg)
    conditions: dict[str, str] = {}
    order = 0
    for i in range(frames):
        scene = i // frames_per_scene
        sample = gen.sample(scene, CONDITIONS[scene % len(CONDITIONS)], frame=i)
        t_rgb = START_NS + i * period_ns + int(rng.normal(0, jitter_ms) * 1e6)
        t_th = START_NS + i * period_ns + int((thermal_offset_ms + rng.normal(0, jitter_ms)) * 1e6)
        drop_rgb = rng.random() < drop_rate
        if rgb_gap is not None and rgb_gap[0] <= i / fps < rgb_gap[1]:
            drop_rgb = True
        drop_th = rng.random() < drop_rate
        rx_rgb = t_rgb + int(rng.uniform(4, 12) * 1e6)
        rx_th = t_th + int(rng.uniform(15, 35) * 1e6)
        if not drop_rgb:
            conditions[str(t_rgb)] = CONDITIONS[scene % len(CONDITIONS)]
            bgr = np.ascontiguousarray(sample.rgb[:, :, ::-1])
            events.append((rx_rgb, order, "rgb", make_image(bgr, "bgr8", t_rgb, RGB_FRAME)))
            events.append((rx_rgb, order + 1, "rgb_info", make_camera_info(w, h, k_rgb, t_rgb, RGB_FRAME)))
            events.append((rx_rgb + 1000, order + 2, "gt", make_image(sample.labels, "mono8", t_rgb, RGB_FRAME)))
        if not drop_th:
            events.append((rx_th, order + 3, "thermal", make_image(sample.thermal, "mono16", t_th, THERMAL_FRAME)))
            events.append((rx_th, order + 4, "thermal_info", make_camera_info(wt, ht, k_t, t_th, THERMAL_FRAME)))
        order += 5
    topics = {
        "rgb": RGB_TOPIC,
        "rgb_info": RGB_INFO_TOPIC,
        "gt": GT_TOPIC,
        "thermal": THERMAL_TOPIC,
        "thermal_info": THERMAL_INFO_TOPIC,
    }
    events.sort(key=lambda e: (e[0], e[1]))
    with BagWriter(bag_path, storage=storage) as writer:
        for rx, _, key, msg in events:
            writer.write(topics[key], msg, rx)
    (out_dir / CONDITIONS_FILE).write_text(json.dumps(conditions, indent=0) + "\n")
    calibration = out_dir / "calibration.yaml"
    with open(calibration, "w") as f:
        f.write("# thermal -> RGB registration of the sample bag's synthetic rig (exact)\n")
        yaml.safe_dump(calibrated.calibration_dict(), f, sort_keys=False)
    write_param_file(
        bag_path / BAG_PARAMS,
        rig_parameters(calibration),
        header="segment_node parameters that fit this bag's rig (written by rgbt-seg make-sample-bag).\n"
        "ros2 run rgbt_seg_ros segment_node --ros-args --params-file <this file> -p use_sim_time:=true",
        complete=False,
    )
    return bag_path


def rig_parameters(calibration: Path) -> dict:
    """The node parameters the synthetic rig needs: its homography and its thermal scaling."""
    return {
        "registration.mode": "homography",
        "registration.file": str(Path(calibration).resolve()),
        "thermal.mode": "linear",  # radiometric counts are Kelvin * 100
        "thermal.scale": 0.01,
        "thermal.min": 250.0,
        "thermal.max": 330.0,
        "sync.max_wait": 0.05,
    }
