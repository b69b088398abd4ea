"""Models for benchmarks: a Segmenter with random weights of a config (or from a checkpoint), and a
timed stand-in for a GPU forward. Used by ``rgbt-seg bench`` (pipeline, memory, segmenter) and the CUDA
tests; nothing here imports ROS.
"""

from __future__ import annotations

import time
from pathlib import Path


class StandInModel:
    """A timed stand-in for a forward on a GPU (``--model-ms``): NOT a model.

    It sleeps until ``model_ms`` have passed (the host idle and the GIL free, as while a GPU
    computes) and returns logits of the right shape from a fixed random 1x1 projection of the
    input, so everything around the forward runs on real data."""

    def __init__(self, model_ms: float, num_classes: int, seed: int = 0) -> None:
        import torch

        self.model_ms = float(model_ms)
        self.weight = torch.randn(num_classes, 4, 1, 1, generator=torch.Generator().manual_seed(seed))

    def to(self, device):
        self.weight = self.weight.to(device)
        return self

    def eval(self):
        return self

    def __call__(self, rgb, thermal, valid=None) -> dict:
        import torch
        import torch.nn.functional as F

        end = time.perf_counter() + self.model_ms / 1e3
        logits = F.conv2d(torch.cat([rgb, thermal], dim=1), self.weight.to(rgb.dtype))
        if rgb.device.type == "cuda":
            torch.cuda.synchronize(rgb.device)
        left = end - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return {"logits": logits}


def load_segmenter(
    checkpoint: str | Path | None = None,
    config: str | Path = "models/sartm_tiny.yaml",
    model_size: tuple[int, int] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    model_ms: float | None = None,
    class_set: str | None = None,
):
    """A ``Segmenter`` from a checkpoint directory, else with random weights of ``config``.

    Random weights: nothing frozen (a frozen random encoder is refused by the backends), random
    unit-norm class-name embeddings (no text encoder is loaded). Warm-up forward included.
    ``model_ms``: the config's classes and input size around a :class:`StandInModel` instead.
    ``class_set``: the model's class set to segment with (None: its primary).
    """
    import torch

    from ..models import build_model, dataset_info_for, resolve_model_config
    from ..models.class_sets import random_text_embeddings
    from ..pipeline.segmenter import Segmenter
    from ..resources import resolve_data_file

    if model_ms is not None:
        cfg = resolve_model_config(resolve_data_file(str(config)))
        if model_size is not None:
            cfg["input_size"] = [int(model_size[0]), int(model_size[1])]
        info = dataset_info_for(cfg, None)
        stand_in = StandInModel(model_ms, info.num_classes, seed)
        return Segmenter(stand_in, cfg, info, device=device, precision=precision, class_set=class_set)
    if checkpoint is not None:
        return Segmenter.from_checkpoint(
            resolve_data_file(str(checkpoint)), device=device, precision=precision, class_set=class_set
        )
    torch.manual_seed(seed)
    cfg = resolve_model_config(resolve_data_file(str(config)))
    if model_size is not None:
        cfg["input_size"] = [int(model_size[0]), int(model_size[1])]
        cfg = resolve_model_config(cfg)  # size checked against the backend's multiple
    for section, key in (("encoder", "freeze"), ("decoder", "freeze_transformer")):
        if section in cfg and key in cfg[section] and not cfg[section].get("checkpoint"):
            cfg[section][key] = False
    info = dataset_info_for(cfg, None)
    model = build_model(cfg, info, random_text_embeddings(cfg, info))
    return Segmenter(model, cfg, info, device=device, precision=precision, class_set=class_set)
