"""The train config: every key with its default (:data:`TRAIN_DEFAULTS`) and its checks.

A train config is a plain dict (``--train-config FILE.yaml`` and the ``rgbt-seg train`` flags);
:func:`resolve_train_config` merges it over the defaults and refuses what cannot be trained with,
with a :class:`TrainConfigError` naming the key. The trainer (``trainer.py``) re-exports all of it.

One dataset: ``dataset`` (+ ``data``, ``classes``, ``dataset_options``). Several (joint training over
label spaces, ``training/joint.py``): ``datasets``, a list of entries with the same keys plus
``weight``; the first is the primary (the model's ``classes``, the validation set). See
docs/class_sets.md.
"""

from __future__ import annotations

import copy

from ..data.datasets import DATASET_KINDS
from ..models.preprocessing import PRECISIONS
from ..models.registry import RECIPE_LOSSES, RECIPE_OPTIMIZERS
from .losses import DEFAULT_LOSS_PRESET, LOSS_PRESETS

#: Every train-config key with its default (``--train-config`` files may set any of them).
TRAIN_DEFAULTS: dict = {
    "dataset": None,  # pst900 | mfnet | fmb | folder | synthetic
    "data": None,  # dataset root (not for synthetic)
    "classes": None,  # class file name or path; default: the dataset kind's (folder needs it)
    "dataset_options": {},  # build_dataset keywords (synthetic: count, seed, size, conditions; pst900: thermal_dir)
    # joint training: [{dataset, data, classes, dataset_options, weight}, ...] instead of the four keys above;
    # the first entry is the primary set (model classes, validation); see DATASET_ENTRY_DEFAULTS
    "datasets": None,
    "val_dataset_options": {},  # overrides of dataset_options for the validation set
    "train_split": "train",
    "val_split": "val",  # null: no validation
    "epochs": 50,
    "max_steps": None,  # total optimiser steps (the schedule's length); default epochs x steps per epoch
    "stop_after_steps": None,  # stop (and save last/) after this many steps; the schedule is unchanged
    "batch_size": 2,  # per process
    # optimizer / lr / weight_decay / poly_power / loss.kind: null = the backend's recipe (model config)
    "optimizer": None,  # adamw | adam
    "lr": None,
    "weight_decay": None,
    "betas": [0.9, 0.999],
    "warmup_steps": None,  # default: warmup_fraction of the total steps
    "warmup_fraction": 0.05,
    "warmup_start": 1.0e-3,  # warm-up starts at lr * warmup_start
    "poly_power": None,
    "min_lr": 0.0,
    "grad_clip": None,  # max gradient L2 norm, or null
    "seed": 0,
    "num_workers": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:N (DDP on CUDA uses cuda:LOCAL_RANK)
    "precision": "fp32",  # fp32 | bf16 | fp16 (autocast; CUDA only, CPU always trains in fp32)
    "fit_to_input": True,  # resize each image to fit the model's input size (as the Segmenter does) before augmenting
    "transform": {},  # build_train_transform options; crop_size defaults to the model's input_size
    "modalities": "rgbt",  # rgbt | rgb (thermal blanked: thermal = 0, valid = 0, in training and validation)
    "loss": {
        "kind": None,  # ohem | ce (plain cross-entropy: every labelled pixel); null = the recipe's
        # paper (Table VII: 1, 0.008, 1e4, 100) | authors_code (all 1) | calibrated (the sweep's; docs/training.md)
        "preset": DEFAULT_LOSS_PRESET,
        "weights": None,  # w0 CE(S0), w1 CE(S1), w2 L_cr, w3 L_se; null = the preset's
        # fraction of the run over which w2, w3 ramp linearly from 0; null = the preset's (0 with explicit weights)
        "language_warmup": None,
        "ohem_thresh": 0.7,
        "min_kept_fraction": 1.0 / 16.0,
        "feature_level": "sfm",
        "temperature": 1.0,
        "cr_temperature": 1.0,
        # null | auto (ENet weighting 1 / ln(1.02 + share) from the training labels) | one value per class
        "class_weights": None,
    },
    "val_every": 1,  # epochs between validations
    "val_max_items": None,
    "save_every": 1,  # epochs between last/ checkpoints (last/ is also written at the end and at a stop)
    "log_every": 10,  # steps between metrics.jsonl rows
    "log_grad_norms": True,  # each weighted loss term's gradient norm on the trainable parameters, in logged rows
    "progress": None,  # tqdm bar: null = when stderr is a terminal
    "tensorboard": True,  # also write TensorBoard scalars when the package is installed
    "sam2_checkpoint": None,  # official SAM2 weights (overrides the model config's encoder.checkpoint)
    # steps of the backend's pretraining stage (SegRGB-X: MA-CLIP), run before step 1; null = the model config's
    "pretrain_steps": None,
    "model": {},  # overrides merged into the model config
}


class TrainConfigError(ValueError):
    """A train config that cannot be used; the text names the key and what was expected."""


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_train_config(cfg: dict | None) -> dict:
    """Merge over ``TRAIN_DEFAULTS`` and check it; unknown keys are errors."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(TRAIN_DEFAULTS))
    if unknown:
        raise TrainConfigError(f"train config has unknown key(s) {unknown}; expected some of {sorted(TRAIN_DEFAULTS)}")
    loss_unknown = sorted(set(cfg.get("loss") or {}) - set(TRAIN_DEFAULTS["loss"]))
    if loss_unknown:
        raise TrainConfigError(f"train config loss has unknown key(s) {loss_unknown}")
    out = _merge(TRAIN_DEFAULTS, cfg)
    if out["datasets"] is None:
        _check_dataset(out, "")
    else:
        out["datasets"] = resolve_dataset_entries(out)
    for key in ("epochs", "batch_size"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise TrainConfigError(f"train config '{key}' must be an integer >= 1, got {out[key]!r}")
    for key in ("max_steps", "stop_after_steps", "warmup_steps", "pretrain_steps"):
        if out[key] is not None and (not isinstance(out[key], int) or out[key] < 0):
            raise TrainConfigError(f"train config '{key}' must be null or an integer >= 0, got {out[key]!r}")
    for key in ("lr", "weight_decay", "poly_power"):  # YAML reads 1e-3 (no dot) as a string
        if out[key] is not None:
            try:
                out[key] = float(out[key])
            except (TypeError, ValueError):
                raise TrainConfigError(f"train config '{key}' must be a number, got {out[key]!r}") from None
            if out[key] < 0 or (key == "lr" and out[key] == 0):
                raise TrainConfigError(
                    f"train config '{key}' must be {'> 0' if key == 'lr' else '>= 0'}, got {out[key]}"
                )
    if out["optimizer"] is not None and out["optimizer"] not in RECIPE_OPTIMIZERS:
        raise TrainConfigError(
            f"train config 'optimizer' must be one of {', '.join(RECIPE_OPTIMIZERS)}, got {out['optimizer']!r}"
        )
    if out["loss"]["kind"] is not None and out["loss"]["kind"] not in RECIPE_LOSSES:
        raise TrainConfigError(
            f"train config loss.kind must be one of {', '.join(RECIPE_LOSSES)}, got {out['loss']['kind']!r}"
        )
    if out["modalities"] not in ("rgbt", "rgb"):
        raise TrainConfigError(f"train config 'modalities' must be 'rgbt' or 'rgb', got {out['modalities']!r}")
    if out["precision"] not in PRECISIONS:
        raise TrainConfigError(f"train config 'precision' must be one of {', '.join(PRECISIONS)}")
    loss = out["loss"]
    if loss["preset"] not in LOSS_PRESETS:
        raise TrainConfigError(
            f"train config loss.preset must be one of {', '.join(LOSS_PRESETS)}, got {loss['preset']!r}"
        )
    preset = LOSS_PRESETS[loss["preset"]]
    explicit = loss["weights"] is not None  # explicit weights are used as given: no warm-up unless set
    if not explicit:
        loss["weights"] = list(preset["weights"])
    weights = loss["weights"]
    if not isinstance(weights, (list, tuple)) or len(weights) != 4:
        raise TrainConfigError(f"train config loss.weights must list 4 values (w0..w3), got {weights!r}")
    if loss["language_warmup"] is None:
        loss["language_warmup"] = 0.0 if explicit else preset["language_warmup"]
    try:
        loss["language_warmup"] = float(loss["language_warmup"])
    except (TypeError, ValueError):
        raise TrainConfigError(
            f"train config loss.language_warmup must be a number, got {loss['language_warmup']!r}"
        ) from None
    if not 0.0 <= loss["language_warmup"] <= 1.0:
        raise TrainConfigError(
            f"train config loss.language_warmup must be a fraction of the run in [0, 1], got {loss['language_warmup']}"
        )
    return out


#: Keys of one ``datasets`` entry with their defaults. ``weight``: the entry's share of each epoch's batches
#: (null for every entry: proportional to the dataset's size, i.e. one pass over each; see joint.py).
DATASET_ENTRY_DEFAULTS: dict = {"dataset": None, "data": None, "classes": None, "dataset_options": {}, "weight": None}


def _check_dataset(entry: dict, where: str) -> None:
    """The dataset keys of the train config (``where`` ''), or of one ``datasets`` entry."""
    if entry["dataset"] not in DATASET_KINDS:
        raise TrainConfigError(
            f"{where}unknown dataset '{entry['dataset']}'; expected one of {', '.join(DATASET_KINDS)}"
        )
    data_hint, classes_hint = ("--data DIR", "--classes NAME") if not where else ("key 'data'", "key 'classes': NAME")
    if entry["dataset"] != "synthetic" and not entry["data"]:
        raise TrainConfigError(f"{where}dataset '{entry['dataset']}' needs a data folder ({data_hint})")
    if entry["dataset"] == "folder" and not entry["classes"]:
        raise TrainConfigError(f"{where}dataset 'folder' needs a class file ({classes_hint} or path to a class YAML)")
    if not isinstance(entry["dataset_options"] or {}, dict):
        raise TrainConfigError(f"{where}'dataset_options' must be a mapping, got {entry['dataset_options']!r}")


def resolve_dataset_entries(cfg: dict) -> list[dict]:
    """Check the ``datasets`` list of a train config and fill each entry's defaults."""
    entries = cfg["datasets"]
    if not isinstance(entries, (list, tuple)) or len(entries) < 2:
        raise TrainConfigError(
            f"train config 'datasets' must list at least 2 entries (for one dataset use 'dataset'), got {entries!r}"
        )
    single = [k for k in ("dataset", "data", "classes") if cfg[k] is not None]
    if cfg["dataset_options"]:
        single.append("dataset_options")
    if single:
        raise TrainConfigError(
            f"train config sets both 'datasets' and {', '.join(repr(k) for k in single)}: with 'datasets' every "
            "dataset key goes into its entry (the first entry is the primary)"
        )
    out = []
    for i, entry in enumerate(entries):
        where = f"train config datasets[{i}]: "
        if not isinstance(entry, dict):
            raise TrainConfigError(
                f"{where}expected a mapping with keys {sorted(DATASET_ENTRY_DEFAULTS)}, got {entry!r}"
            )
        unknown = sorted(set(entry) - set(DATASET_ENTRY_DEFAULTS))
        if unknown:
            raise TrainConfigError(
                f"{where}unknown key(s) {unknown}; expected some of {sorted(DATASET_ENTRY_DEFAULTS)}"
            )
        filled = _merge(DATASET_ENTRY_DEFAULTS, entry)
        filled["dataset_options"] = filled["dataset_options"] or {}
        _check_dataset(filled, where)
        weight = filled["weight"]
        if weight is not None:
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise TrainConfigError(f"{where}'weight' must be a number > 0 or null, got {weight!r}") from None
            if not weight > 0 or weight == float("inf"):
                raise TrainConfigError(f"{where}'weight' must be a number > 0 or null, got {filled['weight']!r}")
            filled["weight"] = weight
        out.append(filled)
    given = [e["weight"] is not None for e in out]
    if any(given) and not all(given):
        missing = [i for i, g in enumerate(given) if not g]
        raise TrainConfigError(
            f"train config datasets: give every entry a 'weight' or none (entries {missing} have none); "
            "without weights each dataset's share is its size"
        )
    lc = cfg.get("loss") or {}
    if lc.get("class_weights") is not None:
        raise TrainConfigError(
            "train config loss.class_weights must be null with several 'datasets': each dataset has its own "
            f"classes, so one weight list cannot fit them all (got {lc['class_weights']!r})"
        )
    return out
