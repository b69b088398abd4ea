"""Joint training over several datasets, each in its own label space (train config ``datasets``).

SegRGB-X (eq. 8) trains one model on several RGB-X datasets at once, each batch scored with
cross-entropy **in its own dataset's label space**: the model holds one class set per dataset
(text embeddings of the class names) and its logits are over the set of the batch's dataset. This
module provides the data side of that; the trainer selects the batch's class set on the model
(``select_class_set``) and uses that set's loss.

* :class:`JointDataset`: the datasets as one index space; every item carries ``class_set``, the
  index of its dataset (0 = the primary).
* :class:`JointBatchSampler`: each batch holds items of ONE dataset. An epoch has as many batches as
  one pass over every dataset takes (``sum ceil(N_i / (batch_size * world_size))``). Without
  weights each dataset gets its own number of those batches (its share is its size: every item
  once per epoch, the last batch of a dataset topped up from its next shuffle); with weights the
  batches are shared out in proportion to the weights (largest remainder), a dataset with more
  batches than items continues into its next shuffle, one with fewer sees a different part each
  epoch. The order of the datasets' batches is shuffled too. Everything is a function of
  ``(seed, epoch)``, so a run resumed mid-epoch skips exactly the batches it had already
  trained on (``set_epoch(epoch, skip_batches)``), and under DDP every rank trains on the same
  dataset at each step, on disjoint items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..models.classes import DatasetInfo
from ..models.registry import backend_spec
from .train_config import TrainConfigError


def class_set_names_of(infos: Sequence[DatasetInfo], entries: Sequence[dict]) -> list[str]:
    """The class-set names of the ``datasets`` entries (their DatasetInfo names), refusing a name twice."""
    seen: dict[str, int] = {}
    for i, info in enumerate(infos):
        if info.name in seen:
            j = seen[info.name]
            raise TrainConfigError(
                f"train config datasets[{j}] ({_describe(entries[j])}) and datasets[{i}] ({_describe(entries[i])}) "
                f"both have the class set '{info.name}': each dataset needs its own class set name "
                "(the 'name' in its class file)"
            )
        seen[info.name] = i
    return [info.name for info in infos]


def model_class_sets(model_cfg: dict, infos: Sequence[DatasetInfo]) -> dict:
    """The model config's ``class_sets`` for a joint run: every dataset's set but the primary's (the first)."""
    backend = model_cfg.get("backend")
    if "class_sets" not in backend_spec(backend).defaults:
        raise TrainConfigError(
            f"train config 'datasets' lists {len(infos)} datasets, but backend '{backend}' has one class set "
            "(no class_sets, no select_class_set); joint training needs a backend that segments against "
            "class-name embeddings, such as segrgbx"
        )
    sets = {info.name: info.to_dict() for info in infos[1:]}
    given = model_cfg.get("class_sets") or {}
    if given and given != sets:  # a resumed run's model_config.yaml holds the same sets: fine
        raise TrainConfigError(
            f"the model config lists class_sets {sorted(given)}, but the train config's 'datasets' make "
            f"{sorted(sets)}; with 'datasets' the trainer builds class_sets itself: remove them from the model config"
        )
    return sets


def _describe(entry: dict) -> str:
    text = entry["dataset"]
    if entry.get("classes"):
        text += f", classes {entry['classes']}"
    if entry.get("data"):
        text += f", data {entry['data']}"
    return text


class JointDataset(Dataset):
    """Several datasets as one: index ``offsets[i] + j`` is item ``j`` of part ``i``, with ``class_set = i``.

    The parts are the trainer's augmented datasets; setting ``epoch`` sets it on every part.
    """

    def __init__(self, parts: Sequence[Dataset]) -> None:
        if not parts:
            raise ValueError("JointDataset needs at least one dataset")
        self.parts = list(parts)
        self.sizes = [len(p) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int).tolist()

    @property
    def epoch(self) -> int:
        return int(getattr(self.parts[0], "epoch", 0))

    @epoch.setter
    def epoch(self, value: int) -> None:
        for p in self.parts:
            p.epoch = value

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index within the part) of a joint index."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"joint index {index} outside 0..{len(self) - 1}")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return part, index - self.offsets[part]

    def __getitem__(self, index: int) -> dict:
        part, local = self.locate(index)
        item = self.parts[part][local]
        item["class_set"] = part
        return item


def share_batches(steps: int, sizes: Sequence[int], weights: Sequence[float] | None, per_batch: int) -> list[int]:
    """Batches per dataset in one epoch of ``steps`` batches.

    No weights: ``ceil(size / per_batch)`` each (their sum is ``steps``). Weights: ``steps`` shared out in
    proportion to them by the largest-remainder method (ties go to the earlier dataset).
    """
    if weights is None:
        return [math.ceil(n / per_batch) for n in sizes]
    total = float(sum(weights))
    exact = [steps * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: steps - sum(counts)]:
        counts[i] += 1
    starved = [i for i, c in enumerate(counts) if c == 0]
    if starved:
        raise ValueError(
            f"train config datasets{starved}: its weight gives it no batch in an epoch of {steps}; "
            "raise its weight (its class set would never train)"
        )
    return counts


class JointBatchSampler(Sampler):
    """Batches of joint indices, each from one dataset (see the module docstring). Used as a DataLoader's
    ``batch_sampler``; ``set_epoch(epoch, skip)`` chooses the epoch and skips its first ``skip`` batches."""

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        seed: int,
        weights: Sequence[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if any(n < 1 for n in sizes):
            raise ValueError(f"every dataset of a joint run needs at least one item, got sizes {list(sizes)}")
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int).tolist()
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.weights = None if weights is None else [float(w) for w in weights]
        per_batch = self.batch_size * self.world_size
        self.steps = sum(math.ceil(n / per_batch) for n in self.sizes)
        self.counts = share_batches(self.steps, self.sizes, self.weights, per_batch)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def per_epoch(self) -> int:
        """Batches (optimiser steps) in one epoch."""
        return self.steps

    def plan(self, epoch: int | None = None) -> list[int]:
        """The dataset of each batch of an epoch, in order (the same on every rank)."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = np.repeat(np.arange(len(self.sizes)), self.counts)
        return np.random.default_rng([self.seed, epoch]).permutation(order).tolist()

    def _stream(self, part: int, epoch: int, length: int) -> np.ndarray:
        """The first ``length`` item indices of one dataset's epoch: its shuffles, one after the other."""
        chunks, have, cycle = [], 0, 0
        while have < length:
            chunks.append(np.random.default_rng([self.seed, epoch, part + 1, cycle]).permutation(self.sizes[part]))
            have += self.sizes[part]
            cycle += 1
        return np.concatenate(chunks)[:length] if chunks else np.zeros(0, dtype=np.int64)

    def batches(self, epoch: int | None = None) -> list[tuple[int, list[int]]]:
        """``(dataset, joint indices)`` of this rank's batches of an epoch, in order (none skipped)."""
        epoch = self.epoch if epoch is None else int(epoch)
        b, w = self.batch_size, self.world_size
        streams = [self._stream(i, epoch, self.counts[i] * b * w) for i in range(len(self.sizes))]
        served = [0] * len(self.sizes)
        out = []
        for part in self.plan(epoch):
            start = (served[part] * w + self.rank) * b
            local = streams[part][start : start + b]
            out.append((part, [self.offsets[part] + int(j) for j in local]))
            served[part] += 1
        return out

    def indices(self) -> list[int]:
        """This rank's joint indices for the rest of the epoch (after the skipped batches), flattened."""
        return [j for _, batch in self.batches()[self.skip :] for j in batch]

    def __iter__(self):
        return iter([batch for _, batch in self.batches()[self.skip :]])

    def __len__(self) -> int:
        return max(0, self.steps - self.skip)
