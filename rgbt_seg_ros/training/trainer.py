"""The training loop behind ``rgbt-seg train``: seeded, exactly resumable, single process or DDP.

A run is described by two dicts: the **model config** (``models/*.yaml``, resolved by
:func:`rgbt_seg_ros.models.resolve_model_config`) and the **train config** (``TRAIN_DEFAULTS``
in :mod:`.train_config`; from ``--train-config FILE.yaml`` and the command-line flags). The train config's
``model:`` section overrides model-config keys (e.g. ``{output: {combine: s0}}``), so one model
YAML serves several experiments.

What one step does: a batch of augmented items (:mod:`.transforms`, each item's randomness drawn
from ``(seed, epoch, index)``, so workers, ranks and resumption never change it) is normalised
with :func:`rgbt_seg_ros.models.preprocessing.normalize_batch` (the Segmenter's own function), run through
the model, scored with :class:`.losses.SartmLoss` (eq. 15) and optimised with the backend's
**recipe** (the ``recipe`` section of its model config: optimizer AdamW or Adam, lr, weight decay,
poly power, OHEM or plain cross-entropy; SARTM: AdamW 1e-4, 0.01, poly 0.9, OHEM). A train-config
key that is set (``optimizer``, ``lr``, ``weight_decay``, ``poly_power``, ``loss.kind``) wins over the
recipe; :func:`apply_recipe` merges them and ``Trainer.recipe_line`` says what was used. No weight
decay on biases and 1-D parameters (as the papers' code); the learning rate follows a linear
warm-up then the poly decay (:class:`WarmupPolySchedule`; power 0 = constant).

Outputs under ``OUT``::

    OUT/last/    checkpoint (model.safetensors + config.yaml, the format of checkpoint.py)
                 + train_state.pt (optimizer, RNG states, step, best mIoU; torch.load(weights_only=True))
                 + train_config.yaml
    OUT/best/    checkpoint with the best validation mIoU (+ metrics.json)
    OUT/metrics.jsonl          one JSON object per logged step and per validation
    OUT/model_config.yaml      the resolved model config (with the SAM2 path), used by --resume
    OUT/train_config.yaml      the train config
    OUT/tensorboard/           scalars, when the ``tensorboard`` package is installed

Checkpoint directories are written to a temporary directory and renamed into place, so a crash
while saving leaves the previous ``last/`` intact.

Exact resumption: ``last/`` holds the trained tensors, the AdamW state, the step and epoch, the
python / numpy / torch (and CUDA) RNG states and the prototype memory of the loss. Resuming
from a mid-epoch stop skips the batches the epoch had already served (the epoch's order is a
function of the seed and the epoch). On CPU, N steps in one go and N/2 + resume + N/2 give
bit-identical weights (``test/test_trainer.py``), also for a backend that draws from torch's global
RNG while training (see ``Trainer._epoch_batches``) and for joint runs (``test/test_class_sets.py``).

Several datasets (train config ``datasets``, a backend with class sets such as segrgbx): each batch
comes from one dataset (:mod:`.joint`), the model is switched to that dataset's class set and the
batch is scored in that dataset's own label space by that set's loss; validation and the checkpoint's
``classes`` are the first (primary) dataset's, the others travel in the model config's ``class_sets``
(docs/class_sets.md). The train config's keys and checks live in :mod:`.train_config`.

Distributed: started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the
environment) the trainer joins a process group (``nccl`` on CUDA, ``gloo`` on CPU), wraps the
model in DistributedDataParallel and the data in a DistributedSampler; ``batch_size`` is per
process; validation is sharded and the confusion matrices summed; only rank 0 writes files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data.datasets import SYNTHETIC_CAMERA_SIZE, DatasetError, build_dataset
from ..data.transforms import build_train_transform, fit_item, rgb_bytes
from ..models import LOSS_TERMS, backend_loss_terms, build_model, load_model_config, resolve_model_config
from ..models.class_sets import text_embeddings_for
from ..models.classes import DatasetInfo, load_dataset_info
from ..models.preprocessing import PRECISIONS, fit_size, normalize_batch, resolve_device
from ..models.registry import DEFAULT_RECIPE
from .joint import JointBatchSampler, JointDataset, class_set_names_of, model_class_sets
from .losses import SartmLoss, enet_class_weights
from .train_config import (  # noqa: F401  (re-exported: the train config's keys and checks live there)
    DATASET_ENTRY_DEFAULTS,
    TRAIN_DEFAULTS,
    TrainConfigError,
    _merge,
    resolve_train_config,
)

TRAIN_STATE_FILE = "train_state.pt"
TRAIN_CONFIG_FILE = "train_config.yaml"
MODEL_CONFIG_FILE = "model_config.yaml"
METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------- recipe, schedule, optimiser

#: A VQ backend's codebook statistics (``out["codebook"]``) logged as ``codebook_<name>`` per step.
CODEBOOK_STATS = ("perplexity", "usage", "restarted")

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


# --------------------------------------------------------------------------- seeding and RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


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


# --------------------------------------------------------------------------- data


def _compact(item: dict) -> dict:
    """A fitted item as it is cached: RGB and valid as uint8, labels as int16 (exact: RGB is 8-bit data)."""
    out = dict(item)
    out["rgb"] = rgb_bytes(item["rgb"])
    out["valid"] = item["valid"].astype(np.uint8)
    out["labels"] = item["labels"].astype(np.int16)
    return out


def _expand(cached: dict) -> dict:
    out = dict(cached)
    out["rgb"] = cached["rgb"].astype(np.float32) * np.float32(1.0 / 255.0)
    out["valid"] = cached["valid"].astype(np.float32)
    out["labels"] = cached["labels"].astype(np.int64)
    return out


#: (dataset cache_key, fit size) -> {index: fitted item}, shared by the trainers of one process
_FITTED_ITEMS: dict[tuple, dict[int, dict]] = {}


class AugmentedDataset(Dataset):
    """A dataset's items, fitted to the model's input size (:func:`.transforms.fit_item`, the
    Segmenter's resize) and augmented with a per-item generator seeded by ``(seed, epoch, index)``:
    the same batch content whatever the workers, ranks or resumption.

    ``cache``: keep each fitted item in memory (before augmentation), for generated data whose
    camera-size rendering costs more than a training step (the synthetic scenes: ~0.17 s each at
    640x480), compactly (uint8 RGB and validity, int16 labels: about 0.3 MB at 192x256). Datasets with
    a ``cache_key`` share one cache per process (several runs of one experiment render each scene
    once). The trainer turns it on for synthetic data loaded in the training process."""

    def __init__(
        self, base: Dataset, transform, seed: int, fit_size_hw: tuple[int, int] | None, cache: bool = False
    ) -> None:
        self.base = base
        self.transform = transform
        self.seed = int(seed)
        self.fit_hw = fit_size_hw
        self.epoch = 0
        self.cache: dict | None = None
        if cache:
            key = getattr(base, "cache_key", None)
            self.cache = _FITTED_ITEMS.setdefault((key, fit_size_hw), {}) if key is not None else {}

    def __len__(self) -> int:
        return len(self.base)

    def fitted(self, index: int) -> dict:
        if self.cache is not None and index in self.cache:
            return _expand(self.cache[index])
        item = self.base[index]
        if self.fit_hw is not None:
            h, w = item["labels"].shape[-2:]
            item = fit_item(item, fit_size((h, w), self.fit_hw))
        if self.cache is not None:
            self.cache[index] = _compact(item)
            return _expand(self.cache[index])
        return item

    def __getitem__(self, index: int) -> dict:
        item = self.fitted(int(index))
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        item = self.transform(item, rng)
        item.pop("name", None)  # strings are not needed by the step; keep collation cheap
        return item


class EpochSampler(Sampler):
    """The epoch's index order (shuffled by seed and epoch; a DistributedSampler's shard under DDP),
    optionally skipping the first ``skip`` indices (resuming in the middle of an epoch)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.skip = 0, 0
        self.dist = (
            DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
            if world_size > 1
            else None
        )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def indices(self) -> list[int]:
        if self.dist is not None:
            self.dist.set_epoch(self.epoch)
            order = list(self.dist)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        return order[self.skip :]

    def per_epoch(self) -> int:
        return len(self.dist) if self.dist is not None else self.n

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return max(0, self.per_epoch() - self.skip)


def dataset_info_for_training(cfg: dict) -> DatasetInfo:
    """The classes of a train config (of its primary dataset with ``datasets``), or of one ``datasets`` entry."""
    if cfg.get("datasets"):
        cfg = cfg["datasets"][0]
    if cfg["classes"]:
        return load_dataset_info(cfg["classes"])
    return load_dataset_info(cfg["dataset"])


def dataset_entries(cfg: dict) -> list[dict]:
    """The datasets a resolved train config trains on: its ``datasets`` entries, or one entry made of the
    single-dataset keys (``dataset``, ``data``, ``classes``, ``dataset_options``)."""
    if cfg.get("datasets"):
        return [dict(e) for e in cfg["datasets"]]
    return [{k: cfg[k] for k in ("dataset", "data", "classes", "dataset_options")} | {"weight": None}]


def _dataset(cfg: dict, info: DatasetInfo, split: str, options: dict, input_size) -> Dataset:
    opts = copy.deepcopy(options)
    if cfg["dataset"] == "synthetic":  # rendered at camera size, fitted to the model like a camera frame
        opts["size"] = tuple(opts.get("size") or SYNTHETIC_CAMERA_SIZE)
    try:
        return build_dataset(cfg["dataset"], cfg["data"], split, info, **opts)
    except (DatasetError, FileNotFoundError) as exc:
        raise DatasetError(f"{cfg['dataset']} {split} set: {exc}") from exc


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


# --------------------------------------------------------------------------- checkpoints on disk


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


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Train one model; see the module docstring.

    ``model_config``: path or dict (a model YAML); ``train_config``: dict over ``TRAIN_DEFAULTS``;
    ``text_embeddings``: class-name embeddings (default: computed by the text teacher when the
    model uses language guidance); ``resume``: continue from ``out_dir/last``.
    """

    def __init__(
        self,
        model_config: str | Path | dict,
        train_config: dict,
        out_dir: str | Path,
        text_embeddings: torch.Tensor | None = None,
        resume: bool = False,
    ) -> None:
        self.cfg = resolve_train_config(train_config)
        cfg = self.cfg
        self.out = Path(out_dir).expanduser()
        self.dist = init_distributed(str(cfg["device"]))
        self.device = self._device()

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
        cfg = self.cfg

        seed_everything(int(cfg["seed"]))
        self.text_embeddings = self._text_embeddings(text_embeddings)
        self.model = build_model(self.model_cfg, self.info, self.text_embeddings).to(self.device)
        self.base_weights = (self.model_cfg.get("encoder") or {}).get("checkpoint")

        # data
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

        # loss and optimiser
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
        self.step = 0
        self.pretrained = False  # the backend's pretraining stage has run (or there is none)
        self.best_miou = -1.0
        self.history: list[dict] = []
        self.seen_indices: list[int] = []  # training item indices this process consumed (tests, DDP checks)

        if resume:
            self._resume()
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)

        self._writer = None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_yaml(self.out / TRAIN_CONFIG_FILE, self.cfg)
            self._write_yaml(self.out / MODEL_CONFIG_FILE, self.model_cfg)
            if cfg["tensorboard"]:
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

    @staticmethod
    def _write_yaml(path: Path, data: dict) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False, default_flow_style=None)

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
        with self._autocast():
            out = self.net(rgb, th, valid)
        out = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
        total, comps = loss(out, labels)
        if not math.isfinite(comps["total"]):
            raise FloatingPointError(f"training loss is {comps['total']} at step {self.step}; lower the lr")
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

    def batch_class_set(self, batch: dict) -> str:
        """The class set of a joint run's batch (every item of a batch comes from one dataset)."""
        parts = torch.as_tensor(batch["class_set"]).unique().tolist()
        if len(parts) != 1:
            raise RuntimeError(f"a training batch mixes datasets {parts}; the joint sampler gives one per batch")
        return self.set_names[int(parts[0])]

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
                    if self.step % int(cfg["log_every"]) == 0 or self.step == stop_at:
                        row = {"type": "train", "step": self.step, "epoch": epoch, **comps}
                        row["step_time_s"] = float(np.mean(step_times[-int(cfg["log_every"]) :]))
                        row["peak_rss_mb"] = _peak_rss_mb()
                        self._log(row)
                    if self.step >= stop_at:
                        break
                epoch_done = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                finished = self.step >= self.total_steps
                if epoch_done and self.val_set is not None and ((epoch + 1) % int(cfg["val_every"]) == 0 or finished):
                    last_val = self.validate()
                    row = {"type": "val", "step": self.step, "epoch": epoch}
                    row.update({k: last_val[k] for k in ("miou", "macc", "pixel_acc")})
                    row["per_class_iou"] = dict(
                        zip(self.info.class_names, [_nan_to_none(v) for v in last_val["report"]["iou"]])
                    )
                    self._log(row)
                    if last_val["miou"] > self.best_miou:
                        self.best_miou = float(last_val["miou"])
                        self._save("best", extra={"step": self.step, "epoch": epoch, **_json_metrics(last_val)})
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
