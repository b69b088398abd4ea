"""Setting a run up: the recipe, the learning-rate schedule and parameter groups, seeding, the process group,
and the trainer's construction steps.

:func:`apply_recipe` fills the train config's optimiser keys from the backend's recipe; :class:`WarmupPolySchedule`
and :func:`param_groups` feed the optimiser; :func:`init_distributed` joins torchrun's process group.
:class:`RunSetupMixin` (a base of :class:`.trainer.Trainer`) holds the steps ``Trainer.__init__`` runs in turn:
resolving the model config, building the model, the data loaders, the schedule, the losses and optimiser, the DDP
wrapper and the output directory. Re-exported by :mod:`.trainer`.
"""

from __future__ import annotations

import copy
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ..data.transforms import build_train_transform
from ..models import LOSS_TERMS, backend_loss_terms, build_model, load_model_config, resolve_model_config
from ..models.class_sets import text_embeddings_for
from ..models.classes import DatasetInfo
from ..models.preprocessing import resolve_device
from ..models.registry import DEFAULT_RECIPE
from .joint import JointBatchSampler, JointDataset, class_set_names_of, model_class_sets
from .losses import SartmLoss, enet_class_weights
from .train_config import TrainConfigError, _merge
from .train_data import (
    AugmentedDataset,
    EpochSampler,
    _dataset,
    _worker_init,
    dataset_entries,
    dataset_info_for_training,
)
from .validation import MODEL_CONFIG_FILE, TRAIN_CONFIG_FILE

#: The recipe of a backend that declares none.
FALLBACK_RECIPE = DEFAULT_RECIPE

#: train-config key -> recipe key
RECIPE_KEYS = {"optimizer": "optimizer", "lr": "lr", "weight_decay": "weight_decay", "poly_power": "poly_power"}


def apply_recipe(train_cfg: dict, model_cfg: dict) -> tuple[dict, str]:
    """Fill the train config's unset optimiser keys from the model config's ``recipe``.

    Returns the filled copy and one line saying what was used and what the train config overrode.
    """
    rec = {**FALLBACK_RECIPE, **(model_cfg.get("recipe") or {})}
    out = copy.deepcopy(train_cfg)
    overridden = []
    for key, rkey in RECIPE_KEYS.items():
        if out[key] is None:
            out[key] = rec[rkey]
        elif out[key] != rec[rkey]:
            overridden.append(f"{key} {out[key]:g}" if isinstance(out[key], float) else f"{key} {out[key]}")
    if out["loss"]["kind"] is None:
        out["loss"]["kind"] = rec["loss"]
    elif out["loss"]["kind"] != rec["loss"]:
        overridden.append(f"loss {out['loss']['kind']}")
    source = rec.get("source") or f"{model_cfg.get('backend')} defaults"
    line = f"recipe: {source} ({describe_recipe(rec)})"
    if overridden:
        line += f"; train config overrides {', '.join(overridden)} -> {describe_recipe(out_recipe(out))}"
    return out, line


def out_recipe(train_cfg: dict) -> dict:
    """The recipe a filled train config trains with."""
    return {key: train_cfg[tkey] for tkey, key in RECIPE_KEYS.items()} | {"loss": train_cfg["loss"]["kind"]}


def describe_recipe(rec: dict) -> str:
    """``AdamW lr 0.0001, wd 0.01, poly 0.9, OHEM``."""
    opt = {"adamw": "AdamW", "adam": "Adam"}[rec["optimizer"]]
    sched = "constant lr" if float(rec["poly_power"]) == 0 else f"poly {float(rec['poly_power']):g}"
    loss = {"ohem": "OHEM cross-entropy", "ce": "cross-entropy"}[rec["loss"]]
    return f"{opt} lr {float(rec['lr']):g}, wd {float(rec['weight_decay']):g}, {sched}, {loss}"


@dataclass(frozen=True)
class WarmupPolySchedule:
    """Linear warm-up from ``lr * warmup_start`` to ``lr`` over ``warmup_steps``, then
    ``min_lr + (lr - min_lr) * (1 - t)^power`` with t going from 0 to 1 over the remaining steps."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 1e-3
    power: float = 0.9
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            frac = self.warmup_start + (1.0 - self.warmup_start) * step / max(1, self.warmup_steps)
            return self.lr * frac
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * (1.0 - t) ** self.power


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: with weight decay, and without (biases, norms, 1-D tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


class RunSetupMixin:
    """The construction steps of :class:`.trainer.Trainer` and the helpers they use."""

    def _resolve_configs(self, model_config: str | Path | dict) -> None:
        """The model config (with the train config's ``model:`` overrides and the datasets' classes and class
        sets), the datasets' class infos, and the train config filled from the backend's recipe."""
        cfg = self.cfg
        raw = load_model_config(model_config)
        raw = _merge(raw, cfg["model"])
        if cfg["sam2_checkpoint"]:
            raw.setdefault("encoder", {})["checkpoint"] = str(cfg["sam2_checkpoint"])
        self.info = dataset_info_for_training(cfg)
        # the datasets and their class sets (one, named by the primary's classes, without 'datasets')
        self.entries = dataset_entries(cfg)
        self.joint = cfg["datasets"] is not None
        self.set_infos = [dataset_info_for_training(e) for e in self.entries] if self.joint else [self.info]
        self.set_names = class_set_names_of(self.set_infos, self.entries)
        raw.pop("dataset", None)
        raw["classes"] = self.info.to_dict()
        if self.joint:
            raw["class_sets"] = model_class_sets(raw, self.set_infos)
        self.model_cfg = resolve_model_config(raw)
        self.input_size = tuple(self.model_cfg["input_size"])
        self.cfg, self.recipe_line = apply_recipe(cfg, self.model_cfg)

    def _build_model(self, text_embeddings) -> None:
        """Seed the run, then build the model (with its class-name embeddings) on the device."""
        seed_everything(int(self.cfg["seed"]))
        self.text_embeddings = self._text_embeddings(text_embeddings)
        self.model = build_model(self.model_cfg, self.info, self.text_embeddings).to(self.device)
        self.base_weights = (self.model_cfg.get("encoder") or {}).get("checkpoint")

    def _build_data(self) -> Dataset:
        """Training and validation sets, sampler and loader; returns the primary dataset's raw training set."""
        cfg = self.cfg
        transform_cfg = {"crop_size": list(self.input_size), "ignore_index": self.info.ignore_index}
        transform_cfg.update(cfg["transform"] or {})
        self.transform = build_train_transform(transform_cfg)
        parts = [self._augmented(i, entry, info) for i, (entry, info) in enumerate(zip(self.entries, self.set_infos))]
        base = parts[0].base
        primary = self.entries[0]
        self.val_set = None
        if cfg["val_split"]:
            val_opts = _merge(primary["dataset_options"], cfg["val_dataset_options"])
            self.val_set = _dataset(primary, self.info, cfg["val_split"], val_opts, self.input_size)
        self._build_loader(parts)
        return base

    def _build_loader(self, parts: list[AugmentedDataset]) -> None:
        """The training set, its sampler and DataLoader, and the steps per epoch (one dataset, or joint)."""
        cfg = self.cfg
        workers = {"num_workers": int(cfg["num_workers"]), "worker_init_fn": _worker_init}
        if not self.joint:
            self.train_set = parts[0]
            self.sampler = EpochSampler(len(self.train_set), int(cfg["seed"]), self.dist.rank, self.dist.world_size)
            self.loader = DataLoader(
                self.train_set,
                batch_size=int(cfg["batch_size"]),
                sampler=self.sampler,
                **workers,
                drop_last=False,
                pin_memory=self.device.type == "cuda",
            )
            self.steps_per_epoch = math.ceil(self.sampler.per_epoch() / int(cfg["batch_size"]))
        else:  # every batch from one dataset (joint.py)
            self.train_set = JointDataset(parts)
            weights = [e["weight"] for e in self.entries] if self.entries[0]["weight"] is not None else None
            self.sampler = JointBatchSampler(
                self.train_set.sizes,
                int(cfg["batch_size"]),
                int(cfg["seed"]),
                weights,
                self.dist.rank,
                self.dist.world_size,
            )
            self.loader = DataLoader(
                self.train_set, batch_sampler=self.sampler, **workers, pin_memory=self.device.type == "cuda"
            )
            self.steps_per_epoch = self.sampler.per_epoch()

    def _build_schedule(self) -> None:
        """The planned steps and epochs, and the learning-rate schedule (warm-up, then poly)."""
        cfg = self.cfg
        self.total_steps = int(cfg["max_steps"] or cfg["epochs"] * self.steps_per_epoch)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        warmup = cfg["warmup_steps"]
        if warmup is None:
            warmup = int(round(float(cfg["warmup_fraction"]) * self.total_steps))
        self.schedule = WarmupPolySchedule(
            float(cfg["lr"]),
            self.total_steps,
            min(int(warmup), self.total_steps),
            float(cfg["warmup_start"]),
            float(cfg["poly_power"]),
            float(cfg["min_lr"]),
        )

    def _build_loss_and_optimizer(self, base: Dataset) -> None:
        """One loss per class set, the optimiser over the parameter groups, and the AMP grad scaler."""
        cfg = self.cfg
        lc = cfg["loss"]
        # a backend with one segmentation output (CPAL, FusionSAM) trains on the terms it supports
        self.loss_terms = backend_loss_terms(self.model)
        self.class_weights = self._class_weights(lc["class_weights"], base)
        # one loss per class set: its ignore index, and its own prototype memory (classes differ per set)
        self.losses = {name: self._set_loss(info) for name, info in zip(self.set_names, self.set_infos)}
        self.loss = self.losses[self.info.name]
        optimizer = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[cfg["optimizer"]]
        self.optimizer = optimizer(
            param_groups(self.model, float(cfg["weight_decay"])), lr=float(cfg["lr"]), betas=tuple(cfg["betas"])
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and cfg["precision"] == "fp16")

    def _wrap_distributed(self) -> None:
        """``self.net``: the model, wrapped in DistributedDataParallel under DDP."""
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)

    def _open_outputs(self) -> None:
        """On rank 0: the output directory, the resolved configs in it, and the TensorBoard writer."""
        self._writer = None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_yaml(self.out / TRAIN_CONFIG_FILE, self.cfg)
            self._write_yaml(self.out / MODEL_CONFIG_FILE, self.model_cfg)
            if self.cfg["tensorboard"]:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(str(self.out / "tensorboard"))
                except ImportError as e:  # a robot install without tensorboard: scalars still go to metrics.jsonl
                    warnings.warn(
                        f"TensorBoard scalars are off ({e}); metrics.jsonl has them", RuntimeWarning, stacklevel=2
                    )
                    self._writer = None

    # ------------------------------------------------------------------ helpers
    def _text_embeddings(self, given):
        """Class-name embeddings for build_model: the given ones, or the text teacher's when the model uses
        language; a dict ``{set: (K, D)}`` when the model config has class sets."""
        has_sets = bool(self.model_cfg.get("class_sets"))
        if given is not None:
            if has_sets and not isinstance(given, dict):
                raise ValueError(
                    f"text_embeddings: the model has class sets {list(self.set_names)}; pass a dict "
                    "{set name: (K, D) tensor} for every set, or None to compute them with the text teacher"
                )
            if isinstance(given, dict):
                missing = [n for n in self.set_names if n not in given]
                if missing:
                    raise ValueError(f"text_embeddings has no entry for class set(s) {missing}")
            return given
        lang = self.model_cfg.get("language") or {}
        if not lang.get("enabled"):
            return None
        from ..models.text_teacher import class_text_embeddings

        backend = lang.get("text_encoder", "minilm")
        return text_embeddings_for(self.model_cfg, self.info, lambda names: class_text_embeddings(names, backend))

    def _augmented(self, index: int, entry: dict, info: DatasetInfo) -> AugmentedDataset:
        """One dataset's training items, fitted and augmented (the primary with the run's transform)."""
        cfg = self.cfg
        transform = self.transform
        if info.ignore_index != self.info.ignore_index:
            transform_cfg = {"crop_size": list(self.input_size), "ignore_index": info.ignore_index}
            transform = build_train_transform(transform_cfg | (cfg["transform"] or {}))
        base = _dataset(entry, info, cfg["train_split"], entry["dataset_options"], self.input_size)
        return AugmentedDataset(
            base,
            transform,
            int(cfg["seed"]) + 1_000_003 * index,  # the primary's items are augmented as in a one-dataset run
            self.input_size if cfg["fit_to_input"] else None,
            # in-process only: DataLoader workers are made anew each epoch and would lose it
            cache=entry["dataset"] == "synthetic" and int(cfg["num_workers"]) == 0,
        )

    def _set_loss(self, info: DatasetInfo) -> SartmLoss:
        lc = self.cfg["loss"]
        return SartmLoss(
            weights=tuple(float(w) if t in self.loss_terms else 0.0 for t, w in zip(LOSS_TERMS, lc["weights"])),
            ignore_index=info.ignore_index,
            ohem_thresh=float(lc["ohem_thresh"]),
            # plain cross-entropy = OHEM that keeps every labelled pixel
            min_kept_fraction=1.0 if lc["kind"] == "ce" else float(lc["min_kept_fraction"]),
            feature_level=lc["feature_level"],
            temperature=float(lc["temperature"]),
            cr_temperature=float(lc["cr_temperature"]),
            class_weights=None if self.class_weights is None else torch.tensor(self.class_weights),
        )

    def _class_weights(self, setting, base: Dataset) -> list[float] | None:
        """loss.class_weights: None, explicit per-class values, or ``auto`` from the training labels."""
        n = self.info.num_classes
        if setting is None:
            return None
        if setting == "auto":
            counts = np.zeros(n, dtype=np.int64)
            for i in range(len(base)):
                labels = np.asarray(base[i]["labels"])
                labels = labels[labels != self.info.ignore_index]
                counts += np.bincount(labels.ravel().astype(np.int64), minlength=n)[:n]
            weights = enet_class_weights(counts)
            if self.dist.is_main:
                named = dict(zip(self.info.class_names, weights))
                print(f"class weights (ENet, from the training labels): {named}", flush=True)
            return weights
        if not isinstance(setting, (list, tuple)) or len(setting) != n:
            raise TrainConfigError(
                f"train config loss.class_weights must be null, 'auto' or {n} values (one per class), got {setting!r}"
            )
        return [float(x) for x in setting]

    def _device(self) -> torch.device:
        name = str(self.cfg["device"])
        if self.dist.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(self.dist.local_rank)
            return torch.device(f"cuda:{self.dist.local_rank}")
        return resolve_device(name)
