"""CUDA: the Segmenter and a training step on a GPU agree with the CPU, in fp32, bf16/fp16 and compiled.

Every test here is marked ``cuda``: without a GPU the conftest hook skips them ("no CUDA device");
``scripts/gpu_check.sh`` runs them on a GPU machine (``pytest -m cuda``). Models are the micro
configs with random weights (``bench.models.load_segmenter``, seeded: the CPU and the CUDA
copy have the same weights). Where CUDA results are compared with the CPU's, TF32 is switched
off, so both compute in full fp32 and differ by rounding only.
"""

import contextlib
import math

import numpy as np
import pytest
import torch

from rgbt_seg_ros.bench.models import load_segmenter
from rgbt_seg_ros.bench.segmenter_benchmark import synthetic_pair
from rgbt_seg_ros.models.preprocessing import normalize_batch
from rgbt_seg_ros.pipeline.segmenter import Segmenter

pytestmark = pytest.mark.cuda

MICRO = "models/sartm_micro.yaml"
MICRO_CONFIGS = ["models/sartm_micro.yaml", "models/cpal_micro.yaml", "models/fusionsam_micro.yaml"]
# autocast against fp32 on the same GPU: relative L2 error of the class-centred logits, and the share of
# pixels with the same arg-max (random weights give a flat softmax, so near-ties flip under bf16). On a
# CPU (bf16/fp16 autocast there) the micro models gave 0.2-0.9 % / 98-99 % (bf16), 0.03-0.15 % / 99.7 % (fp16).
AUTOCAST_LIMITS = {"bf16": (0.05, 0.90), "fp16": (0.01, 0.97)}


@contextlib.contextmanager
def no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def scene():
    """A synthetic street scene at the micro models' input size (96x128), thermal in [0, 1]."""
    return synthetic_pair((96, 128), seed=3)


def model_logits(seg: Segmenter, rgb: np.ndarray, thermal: np.ndarray, precision: str = "fp32") -> torch.Tensor:
    """The backend's logits for one pair (already at the input size), on the Segmenter's device, as fp32."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().to(seg.device)
    t = torch.from_numpy(thermal)[None, None].to(seg.device)
    x, t = normalize_batch(seg.config, x, t, rgb_range=255.0)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with torch.inference_mode(), torch.autocast(seg.device.type, dtype=dtype, enabled=dtype is not None):
        return seg.model(x, t, None)["logits"].float()


def centred_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of logits after removing each pixel's mean over classes (arg-max is shift-free)."""
    a = a.cpu() - a.cpu().mean(dim=1, keepdim=True)
    b = b.cpu() - b.cpu().mean(dim=1, keepdim=True)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("config", MICRO_CONFIGS)
def test_segmenter_on_cuda_matches_cpu(config, scene):
    rgb, thermal = scene
    valid = np.ones(thermal.shape, bool)
    valid[:, : thermal.shape[1] // 3] = False  # the thermal camera sees two thirds of the image
    with no_tf32():
        cpu = load_segmenter(config=config, device="cpu")
        gpu = load_segmenter(config=config, device="cuda")
        assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
        for mask in (None, valid):
            a, b = cpu(rgb, thermal, mask), gpu(rgb, thermal, mask)
            assert b.labels.shape == rgb.shape[:2] and b.labels.dtype == a.labels.dtype
            assert np.mean(a.labels == b.labels) >= 0.99
            assert np.abs(a.confidence - b.confidence).max() < 1e-3
            assert b.timings["model"] > 0
        err = centred_error(model_logits(gpu, rgb, thermal), model_logits(cpu, rgb, thermal))
    assert err < 1e-3, err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_are_finite_and_close_to_fp32(precision, scene):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    rgb, thermal = scene
    ref = load_segmenter(config=MICRO, device="cuda")
    seg = Segmenter(ref.model, ref.config, ref.dataset_info, device="cuda", precision=precision)
    res, res32 = seg(rgb, thermal), ref(rgb, thermal)
    assert np.isfinite(res.confidence).all() and res.confidence.min() >= 0 and res.confidence.max() <= 1
    max_err, min_agree = AUTOCAST_LIMITS[precision]
    assert np.mean(res.labels == res32.labels) >= min_agree
    logits = model_logits(seg, rgb, thermal, precision)
    assert torch.isfinite(logits).all()
    assert centred_error(logits, model_logits(ref, rgb, thermal)) < max_err


def test_compile_default_runs_and_matches_eager(scene):
    rgb, thermal = scene
    eager = load_segmenter(config=MICRO, device="cuda")
    torch._dynamo.reset()
    compiled = Segmenter(eager.model, eager.config, eager.dataset_info, device="cuda", compile="default")
    assert compiled.compile_mode == "default"
    for _ in range(2):  # the second call must reuse the compiled graph (static shapes)
        res = compiled(rgb, thermal)
    ref = eager(rgb, thermal)
    assert np.mean(res.labels == ref.labels) >= 0.99
    assert np.abs(res.confidence - ref.confidence).max() < 1e-2
    assert res.timings["model"] > 0


def _trainer(tmp_path, device: str, precision: str = "fp32"):
    from rgbt_seg_ros.training.trainer import Trainer

    text = torch.nn.functional.normalize(torch.randn(8, 384, generator=torch.Generator().manual_seed(0)), dim=1)
    cfg = {
        "dataset": "synthetic",
        "dataset_options": {"count": 4, "size": [64, 96]},
        "val_split": None,
        "batch_size": 4,
        "max_steps": 1000,
        "warmup_steps": 0,
        "lr": 1e-3,
        "device": device,
        "precision": precision,
        "progress": False,
        "tensorboard": False,
        "transform": {"scale": False, "color_jitter": False},
        "model": {"input_size": [64, 96]},
    }
    return Trainer(MICRO, cfg, tmp_path / f"run_{device}_{precision}", text_embeddings=text)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_on_cuda_learn_a_fixed_batch(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    tr = _trainer(tmp_path, "cuda", precision)
    assert tr.device.type == "cuda" and all(p.is_cuda for p in tr.model.parameters())
    batch = next(iter(tr.loader))
    torch.cuda.reset_peak_memory_stats()
    losses = [tr.train_step(batch)["total"] for _ in range(15)]
    assert all(math.isfinite(v) for v in losses), losses
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    assert torch.cuda.max_memory_allocated() > 0


def test_first_training_step_loss_on_cuda_equals_cpu(tmp_path):
    with no_tf32():
        losses = {}
        for device in ("cpu", "cuda"):
            tr = _trainer(tmp_path, device)  # same seed: same weights and the same augmented batch
            losses[device] = tr.train_step(next(iter(tr.loader)))["total"]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3), losses


def test_bench_train_reports_cuda_peak_memory():
    from rgbt_seg_ros.training.benchmark import bench_train

    r = bench_train(MICRO, batch=2, steps=2, warmup=1, device="cuda", size=(64, 96))
    assert r["device"].startswith("cuda") and r["memory"]["kind"] == "cuda max_memory_allocated"
    assert r["peak_memory_mb"] > r["memory"]["allocated_mb_before_steps"] > 0
    assert r["step_ms_median"] > 0 and r["losses_finite"]
