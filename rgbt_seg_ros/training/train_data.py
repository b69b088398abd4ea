"""The training data of a run: fitted and augmented items, the epoch sampler and the dataset helpers.

:class:`AugmentedDataset` fits each item to the model's input size and augments it with a generator seeded by
``(seed, epoch, index)``; :class:`EpochSampler` gives the epoch's (sharded) index order and skips what a resumed
epoch already served. :func:`dataset_info_for_training`, :func:`dataset_entries` and :func:`_dataset` read the train
config's datasets. Used by :mod:`.run_setup`; re-exported by :mod:`.trainer`.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..data.datasets import SYNTHETIC_CAMERA_SIZE, DatasetError, build_dataset
from ..data.transforms import fit_item, rgb_bytes
from ..models.classes import DatasetInfo, load_dataset_info
from ..models.preprocessing import fit_size


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


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
