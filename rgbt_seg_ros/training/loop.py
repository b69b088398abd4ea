"""The training loop: one optimisation step (AMP, gradient clipping, joint class sets), the backend's
pretraining stage, the epochs with their logging of scalars, and the run summary.

:class:`TrainingLoopMixin` (a base of :class:`.trainer.Trainer`) holds ``train_step``, ``batch_to_inputs``,
``run_pretrain_stage``, ``fit`` and ``close``, plus the logging helpers (``metrics.jsonl``, TensorBoard,
tqdm). :func:`tensorboard_scalars` maps a metrics row to TensorBoard tags. Re-exported by :mod:`.trainer`.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..models.preprocessing import PRECISIONS, normalize_batch
from .losses import language_ramp, term_gradient_norms
from .train_config import TrainConfigError
from .validation import _json_metrics

METRICS_FILE = "metrics.jsonl"

#: A VQ backend's codebook statistics (``out["codebook"]``) logged as ``codebook_<name>`` per step: over all
#: tokens, per modality (FusionSAM's shared codebook: is one modality collapsing onto few codes?), restarts.
CODEBOOK_STATS = (
    "perplexity",
    "usage",
    "perplexity_rgb",
    "perplexity_thermal",
    "usage_rgb",
    "usage_thermal",
    "restarted",
)


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def tensorboard_scalars(row: dict) -> list[tuple[str, float]]:
    """The TensorBoard (tag, value) pairs of a metrics row: ``train/total``, ``val/miou``, and one
    ``val/iou/<class>`` per class with an IoU (classes absent from labels and predictions have none)."""
    kind = row.get("type", "train")
    out = []
    for k, v in row.items():
        if k in ("step", "epoch", "type"):
            continue
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out.append((f"{kind}/{k}", float(v)))
        elif k == "per_class_iou" and isinstance(v, dict):
            out.extend((f"{kind}/iou/{name}", float(x)) for name, x in v.items() if x is not None)
    return out


class TrainingLoopMixin:
    """The trainer's steps, epochs and logging (attributes set up by :class:`.run_setup.RunSetupMixin`)."""

    def _autocast(self):
        if self.device.type != "cuda" or self.cfg["precision"] == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=PRECISIONS[self.cfg["precision"]])

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if not self.dist.is_main:
            return
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for tag, v in tensorboard_scalars(row):
                self._writer.add_scalar(tag, v, row["step"])

    def _show_progress(self) -> bool:
        """tqdm bars: the train config's ``progress``, by default when stderr is a terminal; rank 0 only."""
        show = self.cfg["progress"]
        return bool(sys.stderr.isatty() if show is None else show) and self.dist.is_main

    def _progress(self, total: int, initial: int):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, disable=not self._show_progress(), desc="train", leave=False)

    # ------------------------------------------------------------------ one step
    def batch_to_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        nb = dev.type == "cuda"
        rgb = batch["rgb"].to(dev, non_blocking=nb).float()
        th = batch["thermal"].to(dev, non_blocking=nb).float()
        valid = batch["valid"].to(dev, non_blocking=nb).float()
        labels = batch["labels"].to(dev, non_blocking=nb).long()
        if self.cfg["modalities"] == "rgb":
            th = torch.zeros_like(th)
            valid = torch.zeros_like(valid)
        rgb, th = normalize_batch(self.model_cfg, rgb, th)
        return rgb, th * valid, valid, labels

    def train_step(self, batch: dict) -> dict:
        self.net.train()
        lr = self.schedule(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        rgb, th, valid, labels = self.batch_to_inputs(batch)
        loss, class_set = self.loss, None
        if self.joint:  # the batch's dataset: its class set on the model, its loss (CE in its own label space)
            class_set = self.batch_class_set(batch)
            self.model.select_class_set(class_set)
            loss = self.losses[class_set]
        warmup = float(self.cfg["loss"]["language_warmup"])
        loss.language_factor = language_ramp(self.step, self.total_steps, warmup)
        with self._autocast():
            out = self.net(rgb, th, valid)
        out = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
        total, comps = loss(out, labels)
        if not math.isfinite(comps["total"]):
            raise FloatingPointError(f"training loss is {comps['total']} at step {self.step}; lower the lr")
        if warmup > 0:
            comps["language_factor"] = loss.language_factor
        if self.cfg["log_grad_norms"] and self._logs_step(self.step + 1) and self.dist.is_main:
            params = [p for p in self.model.parameters() if p.requires_grad]
            for name, norm in term_gradient_norms(loss.last_weighted, params).items():
                comps[f"gradnorm_{name}"] = norm
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            comps["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.cfg["grad_clip"]))
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        comps["lr"] = lr
        if class_set is not None:
            comps["class_set"] = class_set
        for key, value in (out.get("codebook") or {}).items():  # FusionSAM's VQ codebook: usage, perplexity
            if key in CODEBOOK_STATS:
                comps[f"codebook_{key}"] = float(value)
        return comps

    def _logs_step(self, step: int) -> bool:
        """Whether the row of ``step`` (counted after the optimiser step) goes to metrics.jsonl."""
        stop_at = self.total_steps
        if self.cfg["stop_after_steps"] is not None:
            stop_at = min(stop_at, int(self.cfg["stop_after_steps"]))
        return step % int(self.cfg["log_every"]) == 0 or step == stop_at

    def batch_class_set(self, batch: dict) -> str:
        """The class set of a joint run's batch (every item of a batch comes from one dataset)."""
        parts = torch.as_tensor(batch["class_set"]).unique().tolist()
        if len(parts) != 1:
            raise RuntimeError(f"a training batch mixes datasets {parts}; the joint sampler gives one per batch")
        return self.set_names[int(parts[0])]

    # ------------------------------------------------------------------ the loop
    def pretrain_sources(self) -> list[tuple[Dataset, tuple[str, ...]]]:
        """(training set, class names) pairs a pretraining stage draws its batches from: one per dataset."""
        if self.joint:
            return [(part, tuple(info.class_names)) for part, info in zip(self.train_set.parts, self.set_infos)]
        return [(self.train_set, tuple(self.info.class_names))]

    def run_pretrain_stage(self) -> None:
        """The backend's pretraining stage (``pretrain_stage`` on the model class), once per run."""
        stage = getattr(self.model, "pretrain_stage", None)
        if self.pretrained or stage is None:
            self.pretrained = True
            return
        if stage != "ma_clip":
            raise TrainConfigError(f"{type(self.model).__name__} asks for an unknown pretraining stage '{stage}'")
        from .ma_clip import pretrain

        steps = self.cfg["pretrain_steps"]
        if steps is None:
            steps = int(self.model_cfg["ma_clip"]["pretrain"]["steps"])
        rows = pretrain(
            self.model,
            self.pretrain_sources(),
            self.model_cfg,
            int(steps),
            int(self.cfg["seed"]),
            self.device,
            log_every=int(self.cfg["log_every"]),
            progress=self._show_progress(),
            blank_thermal=self.cfg["modalities"] == "rgb",
        )
        if int(steps) == 0 and not self.base_weights and getattr(self.model, "ma_clip", None) is not None:
            warnings.warn(
                "MA-CLIP is not pretrained (pretrain_steps 0) and has no base weights: it guides the model with the "
                "features of a random frozen network",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.dist.enabled:  # every rank ran the stage alike; rank 0's result is the one all keep
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, 0)
        for row in rows:
            self._log(row)
        self.pretrained = True

    def _epoch_batches(self, resumed_mid_epoch: bool):
        """The loader's iterator for one epoch. Making it draws the workers' base seed from torch's global RNG
        (DataLoader does that at the start of every epoch). A run resumed mid-epoch restored the RNG state
        saved after that draw, so its draw is undone: otherwise every random op after a mid-epoch resume
        (dropout in the model) would differ from the uninterrupted run."""
        if not resumed_mid_epoch:
            return iter(self.loader)
        state = torch.get_rng_state()
        batches = iter(self.loader)
        torch.set_rng_state(state)
        return batches

    def fit(self) -> dict:
        """Train until the planned steps (or ``stop_after_steps``); returns a summary dict."""
        cfg = self.cfg
        self.run_pretrain_stage()
        stop_at = self.total_steps
        if cfg["stop_after_steps"] is not None:
            stop_at = min(stop_at, int(cfg["stop_after_steps"]))
        t_start = time.perf_counter()
        bar = self._progress(stop_at, self.step)
        last_val: dict | None = None
        step_times: list[float] = []
        try:
            while self.step < stop_at:
                epoch = self.step // self.steps_per_epoch
                skip = self.step % self.steps_per_epoch  # batches of this epoch already trained on
                self.sampler.set_epoch(epoch, skip if self.joint else skip * int(cfg["batch_size"]))
                self.train_set.epoch = epoch
                self.seen_indices.extend(self.sampler.indices())
                t0 = time.perf_counter()
                for batch in self._epoch_batches(resumed_mid_epoch=skip > 0):
                    comps = self.train_step(batch)
                    t1 = time.perf_counter()
                    step_times.append(t1 - t0)
                    t0 = t1
                    bar.update(1)
                    bar.set_postfix(loss=f"{comps['total']:.3f}", lr=f"{comps['lr']:.2e}")
                    if self._logs_step(self.step):
                        row = {"type": "train", "step": self.step, "epoch": epoch, **comps}
                        row["step_time_s"] = float(np.mean(step_times[-int(cfg["log_every"]) :]))
                        row["peak_rss_mb"] = _peak_rss_mb()
                        self._log(row)
                    if self.step >= stop_at:
                        break
                epoch_done = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                finished = self.step >= self.total_steps
                if epoch_done and self.val_set is not None and ((epoch + 1) % int(cfg["val_every"]) == 0 or finished):
                    last_val = self._validate_and_track(epoch)
                if finished or self.step >= stop_at or (epoch_done and (epoch + 1) % int(cfg["save_every"]) == 0):
                    self._save("last", with_state=True)
        finally:
            bar.close()
        if self.dist.enabled:
            for b in self.model.buffers():  # BatchNorm statistics differ per rank: take rank 0's
                dist.broadcast(b, 0)
            dist.barrier()
        summary = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "wall_s": time.perf_counter() - t_start,
            "step_time_s_median": float(np.median(step_times)) if step_times else None,
            "best_miou": self.best_miou if self.best_miou >= 0 else None,
            "last_val": _json_metrics(last_val) if last_val else None,
            "peak_rss_mb": _peak_rss_mb(),
        }
        if self.device.type == "cuda":
            summary["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._writer is not None:
            self._writer.flush()
        return summary

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()
