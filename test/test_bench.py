"""rgbt-seg bench pipeline / memory: the subcommands run, report every stage and write JSON (no timing asserts)."""

import argparse
import json

import pytest

from rgbt_seg_ros.bench.models import load_segmenter
from rgbt_seg_ros.ros import pipeline_benchmark as pb
from rgbt_seg_ros.tools import bench


def parse(argv):
    parser = argparse.ArgumentParser(prog="rgbt-seg bench")
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_pipeline_reports_every_stage_at_each_size(tmp_path, micro_checkpoint, capsys):
    out = tmp_path / "pipe.json"
    args = parse(
        ["pipeline", "--checkpoint", str(micro_checkpoint), "--sizes", "96x128", "121x161",
         "--repeats", "2", "--warmup", "1", "--threads", "1", "--seconds", "0.5", "--json", str(out)]
    )  # fmt: skip
    assert bench.run(args) == 0
    text = capsys.readouterr().out
    for stage in pb.STAGES:
        assert f"| {stage} |" in text
    assert "128x96" in text and "161x121" in text and "overhead" in text
    result = json.loads(out.read_text())
    assert [s["camera_size"] for s in result["sizes"]] == [[96, 128], [121, 161]]
    for size in result["sizes"]:
        assert set(pb.STAGES) <= set(size["stages_ms"])
        assert all(v["median"] >= 0 and v["n"] == 2 for v in size["stages_ms"].values())
        assert size["stages_ms"]["model"]["median"] > 0
        expected = sum(size["stages_ms"][k]["median"] for k in pb.STAGES) - size["stages_ms"]["model"]["median"]
        assert size["overhead_ms_median"] == pytest.approx(
            expected, rel=0.5, abs=5.0
        )  # median of sums vs sum of medians
        assert size["message_class"] in ("rclpy", "rosbags")
        assert size["sustained"]["delivered"] > 0 and size["sustained"]["latency_ms"]["p50"] > 0
    assert "sartm" in result["model"] and result["source"] == str(micro_checkpoint)
    assert result["model_stand_in_ms"] is None and "STAND-IN" not in text


def test_bench_pipeline_with_a_stand_in_forward_says_so_and_is_bounded_by_it(tmp_path, capsys):
    out = tmp_path / "standin.json"
    args = parse(
        ["pipeline", "--config", "models/sartm_micro.yaml", "--model-ms", "20", "--sizes", "96x128",
         "--repeats", "3", "--warmup", "1", "--threads", "1", "--seconds", "1", "--feed-hz", "100", "--json", str(out)]
    )  # fmt: skip
    assert bench.run(args) == 0
    text = capsys.readouterr().out
    assert "STAND-IN" in text and "no model was run" in text and "sustained" in text
    result = json.loads(out.read_text())
    assert result["model_stand_in_ms"] == 20 and "STAND-IN" in result["source"]
    size = result["sizes"][0]
    assert size["stages_ms"]["model"]["median"] >= 20.0
    sustained = size["sustained"]
    # the forward stage takes 20 ms per frame, whatever overlaps it: at most 50 frames per second
    assert 0 < sustained["fps"] <= 52 and sustained["latency_ms"]["p50"] >= 20.0
    assert sustained["fed_pairs"] > sustained["delivered"] and sustained["drops"].get("superseded", 0) > 0


def test_bench_pipeline_with_random_weights_of_a_config():
    seg = load_segmenter(config="models/sartm_micro.yaml", model_size=(64, 96))
    assert seg.input_size == (64, 96)
    result = pb.bench_pipeline(
        segmenter=seg, config="models/sartm_micro.yaml", sizes=[(48, 64)], repeats=1, warmup=0, seconds=0
    )
    assert "random weights" in result["source"]
    assert result["sizes"][0]["stages_ms"]["model"]["median"] > 0
    assert "| model |" in pb.markdown_pipeline(result)


def test_bench_pipeline_reports_the_registration_health_estimate_apart_from_the_frame_path():
    from rgbt_seg_ros.pipeline.params import SPEC_BY_NAME

    seg = load_segmenter(config="models/sartm_micro.yaml", model_size=(64, 96))
    result = pb.bench_pipeline(
        segmenter=seg, config="models/sartm_micro.yaml", sizes=[(96, 128)], repeats=3, warmup=1, seconds=0
    )
    size = result["sizes"][0]
    health = size["registration_health"]
    every = SPEC_BY_NAME["registration.check_every"].default
    assert health["check_every"] == every
    assert health["estimate_ms"]["n"] == 3 and health["estimate_ms"]["median"] > 0
    assert health["estimate_ms"]["p95"] >= health["estimate_ms"]["median"]
    assert health["amortised_ms_per_frame"] == pytest.approx(health["estimate_ms"]["median"] / every)
    assert "registration_health" not in size["stages_ms"]  # not a stage: the total and overhead leave it out
    text = pb.markdown_pipeline(result)
    assert "registration-health estimate" in text and "per frame amortised" in text
    assert "not part of the per-frame budget" in text


def test_bench_memory_reports_rss_along_the_run(tmp_path, micro_checkpoint, capsys):
    out = tmp_path / "mem.json"
    args = parse(
        ["memory", "--checkpoint", str(micro_checkpoint), "--pairs", "12", "--warmup", "3", "--size", "96x128",
         "--samples", "4", "--threads", "1", "--json", str(out)]
    )  # fmt: skip
    assert bench.run(args) == 0
    assert "RSS start" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["pairs"] == 12 and r["outputs_built"] == 15  # every pair formed and published (warm-up included)
    assert [n for n, _ in r["rss_trace"]] == [3, 6, 9, 12]
    assert 0 < r["rss_mb_start"] <= r["rss_mb_after_model_load"] + 1
    assert r["rss_growth_mb"] == pytest.approx(r["rss_mb_end"] - r["rss_mb_after_warmup"])


def test_rss_is_read():
    assert 1.0 < pb.rss_mb() < 1e6


@pytest.mark.parametrize("text", ["480", "480x", "0x640", "axb"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="HEIGHTxWIDTH|positive"):
        bench.parse_size(text)


def test_bad_model_size_fails_with_a_message(capsys):
    args = parse(["pipeline", "--config", "models/sartm_micro.yaml", "--model-size", "100", "100"])
    assert bench.run(args) == 1
    assert "multiples of 32" in capsys.readouterr().err


def test_model_and_node_subcommands_still_parse():
    assert parse(["model", "--config", "models/sartm_micro.yaml"]).target == "model"
    assert parse(["node", "--rate", "30"]).rate == 30.0
