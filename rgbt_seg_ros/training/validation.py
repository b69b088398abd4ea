"""Validation, best-checkpoint tracking, and the run's checkpoints on disk (saving and exact resumption).

:class:`ValidationMixin` (a base of :class:`.trainer.Trainer`) holds ``validate`` (mIoU through the Segmenter,
sharded under DDP), ``_validate_and_track`` (logs a validation row and saves ``best/`` on a new best mIoU),
``train_state``, ``_save`` (``last/`` and ``best/``, written atomically) and ``_resume``. Also here: the file names
of a run's outputs, the global RNG state as tensors (:func:`rng_state`, :func:`set_rng_state`),
:func:`_atomic_dir_write`, :func:`find_last` and the JSON-safe metrics helpers. Re-exported by :mod:`.trainer`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

TRAIN_STATE_FILE = "train_state.pt"
TRAIN_CONFIG_FILE = "train_config.yaml"
MODEL_CONFIG_FILE = "model_config.yaml"


def rng_state() -> dict:
    """All global RNG states as tensors (loadable with ``torch.load(weights_only=True)``)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": torch.tensor(py[1], dtype=torch.int64),
        "python_version": int(py[0]),
        "python_gauss": py[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_dir_write(target: Path, write) -> None:
    """Write a directory via ``write(tmp_dir)``, then swap it into ``target`` (the old one survives a crash)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def find_last(out_dir: Path) -> Path | None:
    """``OUT/last``, or the previous one kept aside by an interrupted save."""
    for name in ("last", ".last.old"):
        d = Path(out_dir) / name
        if (d / TRAIN_STATE_FILE).is_file():
            return d
    return None


def _nan_to_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _json_metrics(val: dict) -> dict:
    rep = val["report"]
    return {
        "miou": _nan_to_none(val["miou"]),
        "macc": _nan_to_none(val["macc"]),
        "pixel_acc": _nan_to_none(val["pixel_acc"]),
        "mf1": _nan_to_none(rep["mf1"]),
        "conditions": rep.get("conditions", {}),
    }


class ValidationMixin:
    """The trainer's validation, best tracking, checkpoint saving and resumption (attributes set up by
    :class:`.run_setup.RunSetupMixin`)."""

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict | None:
        """mIoU on the validation set through the Segmenter (what the node does), sharded under DDP."""
        if self.val_set is None:
            return None
        from ..evaluation.evaluator import SegmentationEvaluator, predict_item
        from ..pipeline.segmenter import Segmenter

        n = len(self.val_set)
        if self.cfg["val_max_items"]:
            n = min(n, int(self.cfg["val_max_items"]))
        precision = self.cfg["precision"] if self.device.type == "cuda" else "fp32"
        seg = Segmenter(
            self.model,
            self.model_cfg,
            self.info,
            device=self.device,
            precision=precision,
            warmup=False,
            class_set=self.info.name,  # validation is on the primary dataset
        )
        ev = SegmentationEvaluator(self.info, max_overlays=0)
        for i in range(self.dist.rank, n, self.dist.world_size):
            item = self.val_set[i]
            ev.update(item, predict_item(seg, item, blank_thermal=self.cfg["modalities"] == "rgb"))
        if self.dist.enabled:
            ev.all_reduce()
        self.model.train()
        res = ev.results()
        return {"miou": res["miou"], "macc": res["macc"], "pixel_acc": res["pixel_acc"], "report": res}

    def _validate_and_track(self, epoch: int) -> dict:
        """Validate at the end of ``epoch``, log the row and save ``best/`` when the mIoU is a new best."""
        last_val = self.validate()
        row = {"type": "val", "step": self.step, "epoch": epoch}
        row.update({k: last_val[k] for k in ("miou", "macc", "pixel_acc")})
        row["per_class_iou"] = dict(zip(self.info.class_names, [_nan_to_none(v) for v in last_val["report"]["iou"]]))
        self._log(row)
        if last_val["miou"] > self.best_miou:
            self.best_miou = float(last_val["miou"])
            self._save("best", extra={"step": self.step, "epoch": epoch, **_json_metrics(last_val)})
        return last_val

    # ------------------------------------------------------------------ state
    def train_state(self) -> dict:
        mem = self.loss.memory
        return {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "total_steps": self.total_steps,
            "best_miou": float(self.best_miou),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "memory_prototypes": mem.prototypes.detach().cpu() if mem.prototypes is not None else None,
            "memory_seen": mem.seen.detach().cpu() if mem.seen is not None else None,
            "pretrained": bool(self.pretrained),
        } | ({"memory_sets": self._set_memories()} if self.joint else {})

    def _set_memories(self) -> dict:
        """Every class set's prototype memory (a joint run; the primary's is also saved as before)."""
        out = {}
        for name, loss in self.losses.items():
            mem = loss.memory
            out[name] = {
                "prototypes": mem.prototypes.detach().cpu() if mem.prototypes is not None else None,
                "seen": mem.seen.detach().cpu() if mem.seen is not None else None,
            }
        return out

    def _save(self, name: str, extra: dict | None = None, with_state: bool = False) -> None:
        from ..models.checkpoint import save_checkpoint

        if not self.dist.is_main:
            return

        if self.joint:  # the checkpoint's classes are the primary set's: write it with that set active
            self.model.select_class_set(self.info.name)

        def write(tmp: Path) -> None:
            save_checkpoint(self.model, self.model_cfg, self.info, tmp, base_weights_path=self.base_weights)
            self._write_yaml(tmp / TRAIN_CONFIG_FILE, self.cfg)
            if with_state:
                torch.save(self.train_state(), tmp / TRAIN_STATE_FILE)
            if extra is not None:
                (tmp / "metrics.json").write_text(json.dumps(extra, indent=2) + "\n")

        _atomic_dir_write(self.out / name, write)

    def _resume(self) -> None:
        from safetensors.torch import load_file

        from ..models.checkpoint import MODEL_FILE, trained_state_dict

        last = find_last(self.out)
        if last is None:
            raise FileNotFoundError(f"--resume: {self.out / 'last'} holds no {TRAIN_STATE_FILE}; nothing to resume")
        tensors = load_file(str(last / MODEL_FILE))
        expected = set(trained_state_dict(self.model))
        if set(tensors) != expected:
            diff = sorted(set(tensors) ^ expected)[:8]
            raise ValueError(f"{last / MODEL_FILE} does not fit this model config (keys differ: {diff})")
        self.model.load_state_dict(tensors, strict=False)
        state = torch.load(last / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
        if int(state["total_steps"]) != self.total_steps:
            warnings.warn(
                f"resuming a run planned for {state['total_steps']} steps with {self.total_steps}: "
                "the learning-rate schedule changes from here on",
                RuntimeWarning,
                stacklevel=2,
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_miou = float(state["best_miou"])
        self.pretrained = bool(state.get("pretrained", self.step > 0))
        if state.get("memory_prototypes") is not None:
            self.loss.memory.prototypes = state["memory_prototypes"].to(self.device)
            self.loss.memory.seen = state["memory_seen"].to(self.device)
        for name, mem in (state.get("memory_sets") or {}).items():
            if name in self.losses and mem["prototypes"] is not None:
                self.losses[name].memory.prototypes = mem["prototypes"].to(self.device)
                self.losses[name].memory.seen = mem["seen"].to(self.device)
        set_rng_state(state["rng"])

    @staticmethod
    def _write_yaml(path: Path, data: dict) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False, default_flow_style=None)
