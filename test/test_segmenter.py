"""Segmenter on CPU: output sizes, dtypes, confidence, resizing with padding, validity, misuse."""

import numpy as np
import pytest
import torch

from conftest import make_micro_checkpoint
from rgbt_seg_ros.models import resolve_model_config
from rgbt_seg_ros.models.classes import DatasetInfo
from rgbt_seg_ros.models.preprocessing import fit_size, resolve_device
from rgbt_seg_ros.pipeline.segmenter import Segmenter

MICRO = "models/sartm_micro.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny tensors


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    # LoRA and the fusion gates moved, so outputs vary with both inputs
    return make_micro_checkpoint(tmp_path_factory.mktemp("seg") / "micro", moved=True)


@pytest.fixture(scope="module")
def seg(ckpt_dir):
    return Segmenter.from_checkpoint(ckpt_dir, device="cpu")


def frame(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.random((h, w), dtype=np.float32)


def test_properties(seg):
    assert seg.backend == "sartm"
    assert seg.device == torch.device("cpu")
    assert seg.precision == "fp32"
    assert seg.input_size == (96, 128)
    assert seg.dataset_info.name == "synthetic"
    assert not seg.model.training


@pytest.mark.parametrize("size", [(96, 128), (120, 200), (200, 90), (37, 51)])
def test_outputs_have_rgb_resolution_dtypes_and_range(seg, size):
    rgb, th = frame(*size)
    res = seg(rgb, th)
    assert res.labels.shape == size and res.labels.dtype == np.uint8
    assert res.confidence.shape == size and res.confidence.dtype == np.float32
    c = seg.dataset_info.num_classes
    assert res.labels.max() < c
    assert (res.confidence >= 1.0 / c - 1e-6).all() and (res.confidence <= 1.0).all()
    assert set(res.timings) == {"preprocess", "model", "postprocess"}
    assert all(v >= 0 for v in res.timings.values())


def test_matches_direct_model_call_at_input_size(seg):
    """At exactly the model size no resizing happens: labels equal the model's own argmax."""
    rgb, th = frame(96, 128, seed=3)
    res = seg(rgb, th)
    norm = seg.config["normalization"]["rgb"]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    x = x / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    t = (torch.from_numpy(th)[None, None] - 0.5) / 0.25
    with torch.no_grad():
        logits = seg.model(x, t)["logits"]
    probs = logits.softmax(1)
    assert (res.labels == probs.argmax(1)[0].numpy()).mean() > 0.999
    assert np.allclose(res.confidence, probs.max(1).values[0].numpy(), atol=1e-4)


def test_thermal_outside_valid_region_is_ignored(seg):
    rgb, th = frame(96, 128, seed=4)
    valid = np.ones((96, 128), bool)
    valid[:, 64:] = False
    th2 = th.copy()
    th2[:, 64:] = 1.0 - th2[:, 64:]
    a, b = seg(rgb, th, valid), seg(rgb, th2, valid)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.confidence, b.confidence)
    c, d = seg(rgb, th), seg(rgb, th2)
    assert not np.array_equal(c.confidence, d.confidence)


def test_aspect_kept_with_padding():
    assert fit_size((480, 640), (96, 128)) == (96, 128)
    assert fit_size((720, 1280), (480, 640)) == (360, 640)
    assert fit_size((1024, 1280), (480, 640)) == (480, 600)


@pytest.mark.parametrize(
    "rgb, thermal, valid, message",
    [
        (np.zeros((32, 32, 3), np.float32), np.zeros((32, 32), np.float32), None, "rgb must be an HxWx3 uint8"),
        (np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.float32), None, "rgb must be an HxWx3 uint8"),
        (np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint16), None, "thermal must be an HxW float32"),
        (np.zeros((32, 32, 3), np.uint8), np.zeros((32, 30), np.float32), None, "sizes differ"),
        (np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.float32), np.ones((32, 32), np.uint8), "bool"),
        ("not an image", np.zeros((32, 32), np.float32), None, "rgb must be"),
    ],
)
def test_misuse_raises_one_clear_error(seg, rgb, thermal, valid, message):
    with pytest.raises(ValueError, match=message):
        seg(rgb, thermal, valid)


def test_bad_device_and_precision(ckpt_dir):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        Segmenter.from_checkpoint(ckpt_dir, device="tpu")
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        Segmenter.from_checkpoint(ckpt_dir, device="cpu", precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_bf16_autocast_on_request(ckpt_dir):
    seg = Segmenter.from_checkpoint(ckpt_dir, device="cpu", precision="bf16", warmup=False)
    res = seg(*frame(96, 128))
    assert res.labels.shape == (96, 128) and np.isfinite(res.confidence).all()


def test_from_config_and_uint16_labels_beyond_255_classes():
    many = DatasetInfo.from_dict(
        {"name": "many", "classes": [{"name": f"class {i}", "color": [i % 256, 0, 0]} for i in range(300)]}
    )
    cfg = resolve_model_config(MICRO)
    cfg["classes"] = many.to_dict()
    cfg["language"]["enabled"] = False
    seg = Segmenter.from_config(cfg, device="cpu", warmup=False, text_embeddings=torch.zeros(300, 384))
    assert seg.dataset_info.num_classes == 300
    res = seg(*frame(64, 64))
    assert res.labels.dtype == np.uint16 and res.labels.max() < 300


def test_from_config_refuses_frozen_random_encoder():
    with pytest.raises(ValueError, match="encoder.checkpoint is not set"):
        Segmenter.from_config(
            "models/sartm_tiny.yaml", dataset="mfnet", device="cpu", text_embeddings=torch.zeros(9, 384)
        )


def test_torch_compile_option_traces_the_model_and_keeps_the_results(ckpt_dir, seg):
    """``compile`` wraps the model in torch.compile and compiles during warm-up. The ``eager`` backend
    runs TorchDynamo's graph capture of the whole model (the part that breaks on unsupported Python)
    without inductor's C++ code generation, which takes minutes on this CPU."""
    from rgbt_seg_ros.models.checkpoint import load_checkpoint

    model, cfg, info = load_checkpoint(ckpt_dir)
    compiled = Segmenter(model, cfg, info, device="cpu", compile="default", compile_backend="eager")
    assert compiled.compile_mode == "default" and compiled._forward is not compiled.model
    rgb, th = frame(120, 160, seed=5)
    a, b = compiled(rgb, th), seg(rgb, th)
    assert np.array_equal(a.labels, b.labels) and np.allclose(a.confidence, b.confidence, atol=1e-5)
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        Segmenter(model, cfg, info, device="cpu", compile="fast")
    with pytest.raises(RuntimeError, match="Set model.compile to none"):
        Segmenter(model, cfg, info, device="cpu", compile="default", compile_backend="no_such_backend")


def test_host_staging_reuses_one_buffer_per_input_and_size():
    from rgbt_seg_ros.pipeline.segmenter import HostStaging

    staging = HostStaging(pin=False)  # pin=True needs CUDA; the reuse logic is the same
    a = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    first = staging("rgb", a)
    ptr = first.data_ptr()
    second = staging("rgb", a[::-1])  # a non-contiguous view is copied in, not aliased
    assert second.data_ptr() == ptr and np.array_equal(second.numpy(), a[::-1])
    assert staging("thermal", np.zeros((2, 2), np.float32)).data_ptr() != ptr
    bigger = staging("rgb", np.ones((4, 4, 3), np.uint8))
    assert bigger.shape == (4, 4, 3) and len(staging._buffers) == 2  # the old rgb size was dropped
