"""``Segmenter(runtime="onnxruntime")``: the same labels as PyTorch, one export per set of weights, a stale or
foreign cached file rebuilt, missing providers reported, and PyTorch as the fallback with the reason."""

import numpy as np
import pytest

from conftest import make_micro_checkpoint
from rgbt_seg_ros.models.onnx_runtime import CACHE_KEY, _file_key
from rgbt_seg_ros.pipeline.segmenter import Segmenter

pytest.importorskip("onnxruntime", reason="onnxruntime is in requirements-dev.txt")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort")
    return make_micro_checkpoint(root / "a", seed=0, moved=True), make_micro_checkpoint(root / "b", seed=1, moved=True)


def frames(n, h=120, w=160):
    rng = np.random.default_rng(5)
    for _ in range(n):
        yield rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.random((h, w), dtype=np.float32)


def test_onnxruntime_segments_as_pytorch_does_and_reuses_its_export(checkpoints, tmp_path):
    a, _ = checkpoints
    torch_seg = Segmenter.from_checkpoint(a, device="cpu")
    ort_seg = Segmenter.from_checkpoint(a, device="cpu", runtime="onnxruntime", onnx_cache_dir=tmp_path)
    report = ort_seg.runtime_report
    assert ort_seg.runtime == "onnxruntime" and report.fallback is None, report
    assert report.providers[0] == "cpu" and report.cache_hit is False
    assert report.parity["ok"] and report.parity["argmax_agreement"] == 1.0
    assert torch_seg.runtime == "torch" and torch_seg.runtime_report.fallback is None
    for rgb, th in frames(3):
        want, got = torch_seg(rgb, th), ort_seg(rgb, th)
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.confidence, want.confidence, atol=1e-4)
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = Segmenter.from_checkpoint(a, device="cpu", runtime="onnxruntime", onnx_cache_dir=tmp_path)
    assert again.runtime_report.cache_hit is True and files[0].stat().st_mtime_ns == mtime  # not exported again


def test_a_stale_or_foreign_cached_file_is_rebuilt_not_used(checkpoints, tmp_path):
    a, b = checkpoints
    seg_a = Segmenter.from_checkpoint(a, device="cpu", runtime="onnxruntime", onnx_cache_dir=tmp_path)
    seg_b = Segmenter.from_checkpoint(b, device="cpu", runtime="onnxruntime", onnx_cache_dir=tmp_path)
    path_a, path_b = seg_a.runtime_report.onnx_path, seg_b.runtime_report.onnx_path
    assert path_a != path_b and seg_b.runtime_report.cache_hit is False  # other weights: another file
    key_a = _file_key(path_a)
    assert key_a and key_a != _file_key(path_b)
    # the other checkpoint's export put where checkpoint a's belongs (a stale or foreign file under its name)
    with open(path_b, "rb") as src, open(path_a, "wb") as dst:
        dst.write(src.read())
    rebuilt = Segmenter.from_checkpoint(a, device="cpu", runtime="onnxruntime", onnx_cache_dir=tmp_path)
    assert rebuilt.runtime_report.cache_hit is False and rebuilt.runtime == "onnxruntime"
    assert _file_key(path_a) == key_a, f"{CACHE_KEY} of the rebuilt file"
    rgb, th = next(frames(1))
    np.testing.assert_array_equal(rebuilt(rgb, th).labels, Segmenter.from_checkpoint(a, device="cpu")(rgb, th).labels)


def test_missing_providers_are_reported_and_none_present_falls_back_to_pytorch(checkpoints, tmp_path):
    import onnxruntime as ort

    a, _ = checkpoints
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has TensorRT: nothing is missing")
    seg = Segmenter.from_checkpoint(
        a, device="cpu", runtime="onnxruntime", providers=("tensorrt", "cpu"), onnx_cache_dir=tmp_path
    )
    report = seg.runtime_report
    assert seg.runtime == "onnxruntime" and report.providers == ["cpu"]
    assert any("tensorrt" in n and "using cpu" in n for n in report.notes), report.notes
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        only_gpu = Segmenter.from_checkpoint(
            a, device="cpu", runtime="onnxruntime", providers=("cuda",), onnx_cache_dir=tmp_path
        )
        assert only_gpu.runtime == "torch"
        assert "cuda" in only_gpu.runtime_report.fallback, only_gpu.runtime_report
        assert only_gpu.runtime_report.summary().startswith("torch (onnxruntime refused:")


def test_a_parity_failure_falls_back_to_pytorch_with_the_figures(checkpoints, tmp_path):
    a, _ = checkpoints
    seg = Segmenter.from_checkpoint(a, device="cpu", runtime="onnxruntime", onnx_cache_dir=tmp_path, onnx_tolerance=0.0)
    report = seg.runtime_report
    assert seg.runtime == "torch", report  # onnxruntime's logits differ from PyTorch's by float rounding
    assert "disagree" in report.fallback and "largest logit difference" in report.fallback
    assert report.parity is not None and not report.parity["ok"]
    rgb, th = next(frames(1))
    assert seg(rgb, th).labels.shape == rgb.shape[:2]  # PyTorch runs


def test_an_unknown_runtime_is_refused(checkpoints):
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        Segmenter.from_checkpoint(checkpoints[0], device="cpu", runtime="tensorrt")


def test_the_node_parameters_choose_the_runtime_and_its_providers(checkpoints, tmp_path):
    """The node and replay build their Segmenter from the model.* parameters (frame_flow.segmenter_from_params)."""
    from rgbt_seg_ros.pipeline.frame_flow import segmenter_from_params
    from rgbt_seg_ros.pipeline.params import defaults

    params = {
        **defaults(),
        "model.checkpoint": str(checkpoints[0]),
        "model.device": "cpu",
        "model.runtime": "onnxruntime",
        "model.providers": "tensorrt, cpu",
        "model.onnx_cache_dir": str(tmp_path),
    }
    seg = segmenter_from_params(params)
    assert seg.runtime == "onnxruntime" and seg.runtime_report.providers_requested == ["tensorrt", "cpu"]
    assert "onnxruntime [" in seg.runtime_report.summary()
    bad = segmenter_from_params({**params, "model.providers": "gpu"})
    assert bad.runtime == "torch" and "model.providers must name some of" in bad.runtime_report.fallback
