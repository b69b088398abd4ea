"""``on_rgb_loss: thermal_only``: when RGB is silent while thermal runs, each thermal frame is segmented alone and
published in the RGB grid. The frame flow's switches (RGB silent, both silent, RGB back), the pipeline's
thermal-only frame, and replay of a bag whose RGB camera stops; the node over DDS is in test_node_integration.py.
"""

import numpy as np
import pytest

from rgbt_seg_ros.data.bags import read_messages, stamp_to_ns
from rgbt_seg_ros.data.sample_bag import RGB_FRAME, write_sample_bag
from rgbt_seg_ros.data.synthetic import SceneGenerator
from rgbt_seg_ros.evaluation.replay import LABELS_TOPIC, replay_bag
from rgbt_seg_ros.pipeline.frame_flow import FrameFlow, FramePipeline
from rgbt_seg_ros.pipeline.params import defaults
from rgbt_seg_ros.pipeline.registration import ThermalRegistrar
from rgbt_seg_ros.pipeline.render import upscale_nearest
from rgbt_seg_ros.pipeline.segmenter import Segmenter

BASE = 1_700_000_000_000_000_000
MS = 1_000_000


def drive(flow, schedule):
    """Feed (t_s, cameras) arrivals at 10 Hz stamps; the frames formed, as ('pair' | 'rgb' | 'thermal', index)."""
    out = []
    for k, (t, cameras) in enumerate(schedule):
        now = BASE + int(t * 1e9)
        frames = []
        if "rgb" in cameras:
            frames += flow.rgb(now, ("h", k), now)
        if "thermal" in cameras:
            frames += flow.thermal(now + 8 * MS, ("h", k), now + 8 * MS)
        for f in frames:
            kind = (
                "pair" if f.rgb is not None and f.thermal is not None else ("rgb" if f.thermal is None else "thermal")
            )
            out.append((kind, (f.rgb or f.thermal)[1]))
    return out


def schedule(*spans):
    """Spans of (seconds, cameras) at 10 Hz, one after the other."""
    t, out = 0.0, []
    for seconds, cameras in spans:
        for _ in range(int(round(seconds * 10))):
            out.append((t, cameras))
            t += 0.1
    return out


def params(**kw):
    return {**defaults(), "sync.max_wait": 0.0, "rgb_timeout": 0.5, "on_rgb_loss": "thermal_only", **kw}


def test_rgb_silent_gives_thermal_only_frames_and_rgb_back_gives_pairs():
    switches = []
    flow = FrameFlow(params(), on_switch=switches.append)
    both, thermal = ("rgb", "thermal"), ("thermal",)
    frames = drive(flow, schedule((1.0, both), (2.0, thermal), (1.0, both)))
    kinds = [k for k, _ in frames]
    first = kinds.index("thermal")
    assert all(k == "pair" for k in kinds[:first])
    thermal_idx = [i for k, i in frames if k == "thermal"]
    # RGB's last frame is 0.9 s; lost once thermal kept arriving for 0.5 s without it: from about 1.5 s on
    assert 14 <= thermal_idx[0] <= 16 and thermal_idx[-1] == 29
    assert kinds[-5:] == ["pair"] * 5 and switches == ["thermal_only", "rgb_thermal"]
    assert flow.mode == "rgb_thermal"


def test_a_pause_of_both_cameras_is_no_rgb_loss_and_wait_publishes_nothing():
    both = ("rgb", "thermal")
    flow = FrameFlow(params())
    frames = drive(flow, schedule((1.0, both), (3.0, ()), (1.0, both)))
    assert {k for k, _ in frames} == {"pair"} and len(frames) >= 19 and flow.mode == "rgb_thermal"
    waiting = FrameFlow(params(on_rgb_loss="wait"))
    frames = drive(waiting, schedule((1.0, both), (2.0, ("thermal",)), (1.0, both)))
    assert {k for k, _ in frames} == {"pair"} and waiting.mode == "rgb_thermal"
    # both watches at once: thermal lost is RGB-only, RGB lost is thermal-only, never both
    flow = FrameFlow(params(thermal_timeout=0.5))
    frames = drive(flow, schedule((1.0, both), (2.0, ("rgb",)), (2.0, ("thermal",))))
    assert [k for k, _ in frames if k != "pair"][:3] == ["rgb"] * 3 and frames[-1][0] == "thermal"


@pytest.fixture(scope="module")
def pipeline(micro_checkpoint):
    p = {**defaults(), "model.checkpoint": str(micro_checkpoint), "thermal.mode": "fixed"}
    p.update({"thermal.min": 25000.0, "thermal.max": 33000.0, "registration.check_every": 0})
    pipe = FramePipeline.from_params(p, segmenter=Segmenter.from_checkpoint(micro_checkpoint, device="cpu"))
    pipe.registrar = ThermalRegistrar.from_dict(SceneGenerator().calibration_dict())
    return pipe


def test_a_thermal_only_frame_is_made_in_the_rgb_grid_from_a_black_rgb_image(pipeline):
    gen = SceneGenerator(seed=4)
    sample = gen.sample(0, "night")
    before = pipeline.prepare(None, sample.thermal)  # no RGB frame seen yet: the calibration's RGB size
    assert before.rgb_hw == (480, 640)
    paired = pipeline.process(sample.rgb[:240, :320].copy(), sample.thermal)  # an RGB camera at 320x240
    assert paired.labels.shape == (240, 320) and not paired.thermal_only
    out = pipeline.process(None, sample.thermal)
    assert out.thermal_only and not out.rgb_only and out.labels.shape == (240, 320)
    prepared = pipeline.prepare(None, sample.thermal)
    black = pipeline.segmenter.prepare(np.zeros((240, 320, 3), np.uint8), np.zeros(prepared.valid_grid.shape))
    assert np.array_equal(prepared.model_input.rgb.numpy(), black.rgb.numpy())  # what RGB dropout trains
    unseen = ~out.valid_grid  # the model's grid
    ignore = pipeline.segmenter.dataset_info.ignore_index
    assert unseen.any() and (out.labels_grid[unseen] == ignore).all()  # no prediction where thermal is blind
    assert (out.labels_grid[~unseen] < pipeline.num_classes).all()
    assert np.array_equal(out.labels, upscale_nearest(out.labels_grid, (240, 320)))
    blind = upscale_nearest(unseen.astype(np.uint8), (240, 320)) > 0
    assert out.confidence[blind].mean() < 0.5 * out.confidence[~blind].mean()
    # the overlay is drawn over the registered thermal image (there is no RGB image)
    thermal_u8 = np.rint(np.clip(out.thermal_registered, 0, 1) * 255)
    alpha = pipeline.overlay_alpha
    colours = out.colored_labels.astype(np.float64)
    expect = (1 - alpha) * thermal_u8[..., None] + alpha * colours
    assert np.abs(out.overlay[out.valid] - expect[out.valid]).max() <= 1.5


def test_replay_of_a_bag_whose_rgb_camera_stops(tmp_path, micro_checkpoint):
    bag = write_sample_bag(
        tmp_path / "s",
        frames=40,
        jitter_ms=1,
        rgb_gap=(1.0, 2.5),
        rgb_size=(96, 128),
        thermal_size=(104, 128),
        scene_seconds=0.5,
    )
    p = {
        **defaults(),
        "model.checkpoint": str(micro_checkpoint),
        "model.device": "cpu",
        "registration.mode": "homography",
        "registration.file": str(tmp_path / "s" / "calibration.yaml"),
        "thermal.mode": "linear",
        "thermal.scale": 0.01,
        "thermal.min": 250.0,
        "thermal.max": 330.0,
        "rgb_timeout": 0.3,
        "on_rgb_loss": "thermal_only",
    }
    m = replay_bag(bag, p, tmp_path / "out", progress=False).metrics
    # 15 RGB frames missing; thermal-only from 0.3 s after RGB's last frame until RGB is back
    assert 9 <= m["thermal_only_frames"] <= 13 and m["pairs"] >= 23 and m["rgb_only_frames"] == 0
    assert m["frames_processed"] == m["pairs"] + m["thermal_only_frames"]
    thermal_stamps = {stamp_to_ns(x.msg.header.stamp) for x in read_messages(bag, ["/thermal/image"])}
    rgb_stamps = {stamp_to_ns(x.msg.header.stamp) for x in read_messages(bag, ["/rgb/image"])}
    out = [x.msg for x in read_messages(tmp_path / "out" / "segmented", [LABELS_TOPIC])]
    only = [x for x in out if stamp_to_ns(x.header.stamp) not in rgb_stamps]
    assert len(only) == m["thermal_only_frames"]
    assert all(stamp_to_ns(x.header.stamp) in thermal_stamps for x in only)  # the thermal message's stamp
    assert {x.header.frame_id for x in out} == {RGB_FRAME} and {(x.height, x.width) for x in out} == {(96, 128)}
    waited = replay_bag(bag, {**p, "on_rgb_loss": "wait"}, tmp_path / "wait", progress=False).metrics
    assert waited["thermal_only_frames"] == 0 and waited["frames_processed"] == waited["pairs"]


def test_thermal_only_waits_for_a_first_rgb_frame_and_ends_when_it_is_no_longer_wanted():
    flow = FrameFlow(params())
    frames = drive(flow, schedule((2.0, ("thermal",))))  # an RGB camera dead from the start: frame and size unknown
    assert frames == [] and flow.mode == "rgb_thermal"
    switches = []
    flow = FrameFlow(params(), on_switch=switches.append)
    drive(flow, schedule((1.0, ("rgb", "thermal")), (1.0, ("thermal",))))
    assert flow.mode == "thermal_only"
    flow.update(params(on_rgb_loss="wait"), sync_changed=False)
    frames = drive(flow, schedule((0.5, ("thermal",))))
    assert frames == [] and flow.mode == "rgb_thermal" and switches == ["thermal_only", "rgb_thermal"]


def test_a_replay_with_auto_correction_repeats_with_the_same_pipeline(tmp_path, micro_checkpoint):
    bag = write_sample_bag(tmp_path / "s", frames=24, thermal_shift_px=(6.0, -3.0), scene_seconds=0.4)
    p = {
        **defaults(),
        "model.checkpoint": str(micro_checkpoint),
        "registration.mode": "homography",
        "registration.file": str(tmp_path / "s" / "calibration.yaml"),
        "registration.check_every": 2,
        "registration.auto_correct": True,
        "registration.correction_rate": 10.0,
    }
    pipe = FramePipeline.from_params(p)  # live-style (its own thread): replay makes it synchronous meanwhile
    runs = [replay_bag(bag, p, tmp_path / f"r{k}", pipeline=pipe, progress=False).metrics for k in range(2)]
    first, second = (m["registration_health"]["estimates"] for m in runs)
    assert first == second and len(first) == 12
    assert abs(first[-1]["applied_x"] - 6.0) < 1.0 and abs(first[-1]["applied_y"] + 3.0) < 1.0
    assert runs[0]["segmentation"]["miou"] == runs[1]["segmentation"]["miou"]
    assert pipe.health.synchronous is False


def test_no_prediction_is_marked_only_with_an_index_that_is_no_class(tmp_path):
    from rgbt_seg_ros.evaluation.metrics import ConfusionMatrix
    from rgbt_seg_ros.models.classes import DatasetInfo

    palette = np.zeros((4, 3), np.uint8)
    assert DatasetInfo("a", ("w", "x", "y", "z"), palette, 255).no_prediction_label(np.uint8) == 255
    assert DatasetInfo("b", ("w", "x", "y", "z"), palette, 3).no_prediction_label(np.uint8) is None  # a class id
    assert DatasetInfo("c", ("w", "x", "y", "z"), palette, 300).no_prediction_label(np.uint8) is None  # too big
    cm = ConfusionMatrix(4, ignore_index=3)  # label 3 ignored in the ground truth, but 3 is a predictable class
    cm.update(np.array([3, 1]), np.array([0, 1]))
    assert cm.unpredicted.sum() == 0 and cm.matrix[0, 3] == 1


def test_a_replay_that_fails_early_leaves_the_callers_monitor_as_it_was(tmp_path, pipeline):
    from rgbt_seg_ros.data.bags import BagError

    bag = write_sample_bag(tmp_path / "s", frames=4, rgb_size=(96, 128), thermal_size=(104, 128))
    (tmp_path / "out" / "segmented").mkdir(parents=True)  # the output bag exists: refused before any frame
    assert pipeline.health.synchronous is False
    with pytest.raises(BagError, match="already exists"):
        replay_bag(bag, defaults(), tmp_path / "out", pipeline=pipeline, progress=False)
    assert pipeline.health.synchronous is False
