"""``rgbt-seg bench train``: the time and peak memory of one training step, with the trainer's own step.

A :class:`~rgbt_seg_ros.training.trainer.Trainer` is built for the model config on the synthetic
set (``batch`` scenes at the model's input size, augmented as in training); one batch is taken
from the trainer's own loader, then ``warmup`` untimed and ``steps`` timed calls of
``Trainer.train_step`` run on it: the batch's copy to the device, normalisation, forward (under
autocast for ``--precision bf16|fp16`` on CUDA), the loss, backward, AdamW with the schedule.
Each step is synchronised on CUDA; the result is the median (and every value). Building the
scenes and the model is timed apart and not part of a step.

Memory:

* CUDA: ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps (the counter is
  reset after the model and batch are in place, so the peak holds the weights, the AdamW state,
  the activations and the gradients); also the memory allocated before the first step and the
  peak reserved by the caching allocator (what ``nvidia-smi`` comes closer to).
* CPU: the resident set size sampled every 2 ms by a thread during the steps: its peak, and its
  growth over the RSS before the first step (activations, gradients, optimiser state).

Weights are random unless ``--sam2-checkpoint`` is given (the compute is the same). A frozen
random encoder is refused by the backends, so the model is built with everything trainable and
the config's freezing (``encoder.freeze``, ``decoder.freeze_transformer``) is applied afterwards,
as ``bench model`` does: the trainable set, and with it the backward and the optimiser state,
are those of fine-tuning with SAM2 weights. ``--trainable all`` trains every parameter instead.
Class-name embeddings are random unit vectors (no text encoder is loaded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="models/sartm_tiny.yaml", help="model config (default models/sartm_tiny.yaml)")
    p.add_argument("--batch", type=int, default=8, help="pairs per training step (default 8)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast on CUDA")
    p.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="model input size (default: config)"
    )
    p.add_argument(
        "--trainable",
        default="configured",
        choices=("configured", "all"),
        help="configured: the config's freezing (default); all: every parameter trains",
    )
    p.add_argument("--sam2-checkpoint", default=None, help="official SAM2 weights (optional; compute is the same)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and scenes (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")


class RssSampler:
    """Peak resident set size of this process, sampled by a thread while the block runs."""

    def __init__(self, interval_s: float = 0.002) -> None:
        from ..memory import rss_mb

        self._rss = rss_mb
        self.interval = interval_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def bench_train(
    config: str | Path = "models/sartm_tiny.yaml",
    batch: int = 8,
    steps: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    precision: str = "fp32",
    size: tuple[int, int] | None = None,
    trainable: str = "configured",
    sam2_checkpoint: str | None = None,
    seed: int = 0,
) -> dict:
    """Build a trainer and time its ``train_step`` on one batch; returns a dict (see module docstring)."""
    import math

    import torch
    import torch.nn.functional as F

    from ..models import resolve_model_config
    from ..models.preprocessing import resolve_device
    from ..resources import resolve_data_file
    from .trainer import Trainer

    if batch < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"batch and steps must be >= 1 and warmup >= 0, got {batch}, {steps}, {warmup}")
    if trainable not in ("configured", "all"):
        raise ValueError(f"trainable must be 'configured' or 'all', got {trainable!r}")
    dev = resolve_device(device)
    config_path = resolve_data_file(str(config))
    base = resolve_model_config(config_path)
    enc, dec = base.get("encoder") or {}, base.get("decoder") or {}
    freeze = (bool(enc.get("freeze")), bool(dec.get("freeze_transformer")))
    random_weights = not (sam2_checkpoint or enc.get("checkpoint"))
    overrides: dict = {}
    if size is not None:
        overrides["input_size"] = [int(size[0]), int(size[1])]
    if random_weights:  # built trainable (a frozen random part is refused), frozen again below
        for section, key in (("encoder", "freeze"), ("decoder", "freeze_transformer")):
            if key in (base.get(section) or {}):
                overrides.setdefault(section, {})[key] = False
    input_size = overrides.get("input_size", base["input_size"])
    train_cfg = {
        "dataset": "synthetic",
        "dataset_options": {"count": int(batch), "size": list(input_size), "seed": int(seed)},
        "val_split": None,
        "batch_size": int(batch),
        "max_steps": int(warmup + steps),
        "warmup_steps": 0,
        "device": str(dev),
        "precision": precision,
        "seed": int(seed),
        "progress": False,
        "tensorboard": False,
        "sam2_checkpoint": sam2_checkpoint,
        "model": overrides,
    }
    text_dim = int((base.get("language") or {}).get("text_dim", 384))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rgbt_bench_train_") as out:
        torch.manual_seed(seed)
        from .trainer import dataset_info_for_training, resolve_train_config

        n_classes = dataset_info_for_training(resolve_train_config(train_cfg)).num_classes
        text = F.normalize(torch.randn(n_classes, text_dim), dim=-1)
        trainer = Trainer(config_path, train_cfg, out, text_embeddings=text)
        try:
            model = trainer.model
            if random_weights and trainable == "configured" and hasattr(model, "set_trainable"):
                model.set_trainable(*freeze)  # AdamW skips parameters without a gradient
            elif trainable == "all":
                for p in model.parameters():
                    p.requires_grad_(True)
            params = list(model.parameters())
            params_total = sum(p.numel() for p in params)
            params_trainable = sum(p.numel() for p in params if p.requires_grad)
            setup_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            item_batch = next(iter(trainer.loader))
            batch_build_s = time.perf_counter() - t1

            def sync() -> None:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)

            memory: dict = {}
            sync()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                memory["allocated_mb_before_steps"] = torch.cuda.memory_allocated(dev) / 2**20
            losses: list[float] = []
            times: list[float] = []
            with RssSampler() as sampler:
                rss_before = sampler.start
                for i in range(warmup + steps):
                    ts = time.perf_counter()
                    comps = trainer.train_step(item_batch)
                    sync()
                    if i >= warmup:
                        times.append(time.perf_counter() - ts)
                    losses.append(float(comps["total"]))
            if dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated(dev) / 2**20
                memory.update(
                    {
                        "kind": "cuda max_memory_allocated",
                        "peak_mb": peak,
                        "growth_mb": peak - memory["allocated_mb_before_steps"],
                        "reserved_peak_mb": torch.cuda.max_memory_reserved(dev) / 2**20,
                    }
                )
            else:
                memory.update(
                    {
                        "kind": "rss",
                        "rss_mb_before_steps": rss_before,
                        "peak_mb": sampler.peak,
                        "growth_mb": sampler.peak - rss_before,
                    }
                )
            finite = all(math.isfinite(v) for v in losses)
            info = trainer.info
            cfg = trainer.model_cfg
        finally:
            trainer.close()
    median = statistics.median(times)
    return {
        "config": str(config),
        "backend": cfg["backend"],
        "description": cfg.get("description", ""),
        "dataset": "synthetic",
        "classes": info.num_classes,
        "input_size": [int(v) for v in cfg["input_size"]],
        "batch": int(batch),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "precision": precision if dev.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(),
        "random_weights": random_weights,
        "trainable": trainable,
        "params_total": params_total,
        "params_trainable": params_trainable,
        "warmup_steps": int(warmup),
        "steps": int(steps),
        "step_ms_median": median * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "pairs_per_s": batch / median if median > 0 else None,
        "peak_memory_mb": memory["peak_mb"],
        "memory_growth_mb": memory["growth_mb"],
        "memory": memory,
        "losses": losses,
        "losses_finite": finite,
        "setup_s": setup_s,
        "batch_build_s": batch_build_s,
        "torch": torch.__version__,
    }


def markdown(r: dict) -> str:
    mem = r["memory"]
    rows = [
        ("config", r["config"]),
        ("backend / classes", f"{r['backend']} / {r['classes']}"),
        ("input (H x W) / batch", f"{r['input_size'][0]} x {r['input_size'][1]} / {r['batch']}"),
        ("device / precision / threads", f"{r['device']} / {r['precision']} / {r['threads']}"),
        ("parameters total / trainable", f"{r['params_total'] / 1e6:.2f} M / {r['params_trainable'] / 1e6:.3f} M"),
        ("training step, median", f"{r['step_ms_median']:.1f} ms ({r['steps']} steps after {r['warmup_steps']})"),
        ("pairs per second", f"{r['pairs_per_s']:.1f}"),
        (f"peak memory ({mem['kind']})", f"{r['peak_memory_mb']:.1f} MB"),
        ("growth during the steps", f"{r['memory_growth_mb']:+.1f} MB"),
        ("loss first / last", f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}"),
        ("model + trainer setup / one batch built", f"{r['setup_s']:.1f} s / {r['batch_build_s']:.2f} s"),
    ]
    if "reserved_peak_mb" in mem:
        rows.insert(8, ("peak reserved by the CUDA allocator", f"{mem['reserved_peak_mb']:.1f} MB"))
    return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def run(args: argparse.Namespace) -> int:
    """``rgbt-seg bench train`` (dispatched from ``tools/bench.py``)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = bench_train(
            args.config,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            precision=args.precision,
            size=tuple(args.size) if args.size else None,
            trainable=args.trainable,
            sam2_checkpoint=args.sam2_checkpoint,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from ..evaluation.reports import write_result_json

    print(markdown(result))
    write_result_json(args.json, result)
    return 0 if result["losses_finite"] else 1
