"""The demo's path on a few frames: sample bag -> player over DDS -> real segment_node -> pictures and metrics."""

import json

import pytest
from PIL import Image

from rgbt_seg_ros.ros.demo import DemoError, run_demo

pytestmark = pytest.mark.integration


def test_demo_path_on_a_few_frames(tmp_path, micro_checkpoint, ros_env, monkeypatch):
    monkeypatch.setenv("ROS_LOG_DIR", ros_env["ROS_LOG_DIR"])
    metrics = run_demo(
        tmp_path / "demo",
        checkpoint=micro_checkpoint,
        frames=20,  # one day scene, one night scene
        domain_id=int(ros_env["ROS_DOMAIN_ID"]),
        log=lambda *_: None,
    )
    out = tmp_path / "demo"
    assert metrics["frames_published"] >= 17  # 20 frames, 5 % drop rate
    assert 3 <= metrics["frames_segmented"] <= metrics["frames_published"]
    assert metrics["latency_ms"]["p50"] > 0 and metrics["latency_ms"]["p95"] >= metrics["latency_ms"]["p50"]
    assert metrics["ground_truth_frames"] == metrics["frames_segmented"] and 0 <= metrics["miou"] <= 1
    assert json.loads((out / "metrics.json").read_text())["frames_segmented"] == metrics["frames_segmented"]
    gif = Image.open(out / "overlay.gif")
    assert gif.n_frames == metrics["frames_segmented"] and gif.size[0] == 320
    assert Image.open(out / "contact_sheet.png").size[0] > 900
    # the night scene is reported on its own (people and cars by their heat) and shown on the sheet
    assert set(metrics["conditions"]) == {"day", "night"}
    assert sum(c["frames"] for c in metrics["conditions"].values()) == metrics["ground_truth_frames"]
    assert set(metrics["night_iou"]) == {"person", "car"}


def test_contact_sheet_rows_start_with_one_frame_per_condition():
    from rgbt_seg_ros.ros.demo import _contact_stamps

    stamps = list(range(40))
    conditions = {s: ("day", "night", "fog", "glare")[s // 10] for s in stamps}
    rows = _contact_stamps(stamps, conditions)
    assert len(rows) == 6 and {conditions[s] for s in rows} == {"day", "night", "fog", "glare"}
    assert [conditions[s] for s in _contact_stamps(stamps[:12], conditions)].count("night") == 1


def test_demo_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(DemoError, match="missing model.safetensors"):
        run_demo(tmp_path / "d", checkpoint=tmp_path / "nothing", log=lambda *_: None)
