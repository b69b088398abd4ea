"""One registry of model backends, and the model-config handling they share.

A backend registers itself with one decorator line::

    @register_backend("sartm", defaults=SARTM_DEFAULTS)
    class SARTM(nn.Module): ...

and is built by name from its YAML config with :func:`build_model`. Every backend is called
as ``forward(rgb, thermal, valid=None) -> dict`` with at least ``logits`` (B, C, H, W).

Training: the trainer's loss (``training/losses.py``, paper eq. 11-15) has four terms, ``ce_s0``,
``ce_s1``, ``l_cr`` and ``l_se``. A backend whose output lacks what some need (``s1``, the
per-modality ``features``) names the ones it supports in a class attribute ``loss_terms``; the
trainer gives the others weight 0 (:func:`backend_loss_terms`). Backend-specific losses come in
the output's ``aux_losses`` dict (weighted scalars, training mode only) and are added to the total.

Config keys shared by all backends (see models/README.md for the full schema):
``backend``, ``dataset`` (class-file name or path) or ``classes`` (inline class list),
``input_size`` [H, W], ``normalization`` {rgb: {mean, std}, thermal: {mean, std}}.
Each backend also declares its training ``recipe`` {optimizer, lr, weight_decay, poly_power, loss}
in its defaults (its paper's: :func:`recipe`); the trainer uses it unless the train config overrides
a key (``training/trainer.py``).
Backend-specific keys come with the backend's defaults; a key that is neither is an error,
so a typo in a YAML file does not pass silently.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..resources import resolve_data_file
from .classes import DatasetInfo, load_dataset_info

#: Keys every model config has, with their defaults.
COMMON_DEFAULTS: dict[str, Any] = {
    "backend": None,
    "dataset": None,
    "classes": None,
    "description": "",
    "input_size": [480, 640],
    "normalization": {
        "rgb": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "thermal": {"mean": [0.5], "std": [0.25]},
    },
}


#: Optimisers and segmentation losses a recipe may name (the trainer builds them).
RECIPE_OPTIMIZERS: tuple[str, ...] = ("adamw", "adam")
RECIPE_LOSSES: tuple[str, ...] = ("ohem", "ce")


def recipe(source: str, optimizer: str, lr: float, weight_decay: float, poly_power: float, loss: str) -> dict:
    """A backend's training recipe, for its defaults' ``recipe`` section.

    ``source``: where the values come from (printed by ``rgbt-seg train``); ``optimizer``: adamw | adam
    (weight decay not on biases and 1-D parameters either way); ``poly_power``: the poly decay after the
    warm-up (0 = constant lr); ``loss``: ohem (eq. 11 of SARTM) | ce (plain cross-entropy).
    """
    return {
        "source": source,
        "optimizer": optimizer,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "poly_power": float(poly_power),
        "loss": loss,
    }


#: SARTM's paper recipe (section IV-A), the default of a backend that declares none.
DEFAULT_RECIPE = recipe("SARTM paper", "adamw", 1.0e-4, 0.01, 0.9, "ohem")


def check_recipe(rec: dict, where: str = "recipe") -> None:
    """Raise ValueError naming the key when a recipe section cannot be trained with."""
    if rec.get("optimizer") not in RECIPE_OPTIMIZERS:
        choices = ", ".join(RECIPE_OPTIMIZERS)
        raise ValueError(f"{where}.optimizer must be one of {choices}, got {rec.get('optimizer')!r}")
    if rec.get("loss") not in RECIPE_LOSSES:
        raise ValueError(f"{where}.loss must be one of {', '.join(RECIPE_LOSSES)}, got {rec.get('loss')!r}")
    for key, low, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("poly_power", 0.0, False)):
        value = rec.get(key)
        try:  # YAML reads 1e-3 (no dot) as a string
            value = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            value = None
        if value is None or not (value > low or (not strict and value == low)):
            raise ValueError(f"{where}.{key} must be a number {'>' if strict else '>='} {low:g}, got {rec.get(key)!r}")
        rec[key] = value


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend: its factory, its config defaults and its input-size multiple."""

    name: str
    factory: Callable[..., nn.Module]
    defaults: dict
    size_multiple: int = 32


_BACKENDS: dict[str, BackendSpec] = {}

#: The trainer's loss terms (training/losses.py), in weight order w0..w3.
LOSS_TERMS: tuple[str, ...] = ("ce_s0", "ce_s1", "l_cr", "l_se")


def backend_loss_terms(model: nn.Module) -> tuple[str, ...]:
    """The loss terms a built model's output supports (all four unless its class narrows them)."""
    terms = tuple(getattr(model, "loss_terms", LOSS_TERMS))
    unknown = sorted(set(terms) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"{type(model).__name__}.loss_terms names unknown term(s) {unknown}; known: {LOSS_TERMS}")
    return terms


def register_backend(name: str, defaults: dict | None = None, size_multiple: int = 32):
    """Class/function decorator: ``factory(cfg, dataset_info, text_embeddings)`` builds backend ``name``."""

    def decorate(factory):
        if name in _BACKENDS and _BACKENDS[name].factory is not factory:
            raise ValueError(f"model backend '{name}' is registered twice")
        _BACKENDS[name] = BackendSpec(name, factory, copy.deepcopy(defaults or {}), size_multiple)
        return factory

    return decorate


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def backend_spec(name: str) -> BackendSpec:
    if name not in _BACKENDS:
        known = ", ".join(available_backends()) or "none"
        raise ValueError(f"unknown model backend '{name}'; registered backends: {known}")
    return _BACKENDS[name]


def load_model_config(config: str | Path | dict) -> dict:
    """A model config as a dict: a dict is copied, a path (absolute, relative or under the
    package's share dir, e.g. ``models/sartm_tiny.yaml``) is read as YAML."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = resolve_data_file(config)
    if not path.is_file():
        raise FileNotFoundError(f"model config {config} does not exist (looked for {path})")
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or "backend" not in data:
        raise ValueError(f"model config {path}: expected a mapping with a 'backend' key")
    return data


def _merge(defaults: dict, user: dict, where: str, unknown: list[str]) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        path = f"{where}{key}"
        if key not in defaults:
            unknown.append(path)
            continue
        default = defaults[key]
        # A non-empty dict default is a section with a fixed set of keys; an empty dict or None is free-form.
        if isinstance(default, dict) and default and isinstance(value, dict):
            out[key] = _merge(default, value, path + ".", unknown)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_model_config(config: str | Path | dict) -> dict:
    """Load a config and merge it over its backend's defaults; reject unknown keys and bad sizes."""
    raw = load_model_config(config)
    spec = backend_spec(raw.get("backend"))
    defaults = {**copy.deepcopy(COMMON_DEFAULTS), **copy.deepcopy(spec.defaults)}
    unknown: list[str] = []
    cfg = _merge(defaults, raw, "", unknown)
    if unknown:
        raise ValueError(
            f"model config for backend '{spec.name}' has unknown key(s) {', '.join(unknown)}; see models/README.md"
        )
    size = cfg["input_size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(s, int) and s > 0 and s % spec.size_multiple == 0 for s in size)
    ):
        raise ValueError(
            f"model config input_size must be [H, W] with positive multiples of {spec.size_multiple}, got {size!r}"
        )
    cfg["input_size"] = [int(s) for s in size]
    if "recipe" in cfg:
        check_recipe(cfg["recipe"])
    for modality, channels in (("rgb", 3), ("thermal", 1)):
        norm = cfg["normalization"].get(modality) or {}
        for key in ("mean", "std"):
            values = norm.get(key)
            if not isinstance(values, (list, tuple)) or len(values) != channels:
                raise ValueError(f"model config normalization.{modality}.{key} must list {channels} value(s)")
        if any(float(s) <= 0 for s in norm["std"]):
            raise ValueError(f"model config normalization.{modality}.std must be positive, got {norm['std']}")
    return cfg


def dataset_info_for(cfg: dict, dataset: str | Path | None = None) -> DatasetInfo:
    """Classes of a model: ``dataset`` if given, else the config's inline ``classes`` or ``dataset``."""
    if dataset is not None:
        return load_dataset_info(dataset)
    if cfg.get("classes"):
        return DatasetInfo.from_dict(cfg["classes"], source="model config 'classes'")
    if cfg.get("dataset"):
        return load_dataset_info(cfg["dataset"])
    raise ValueError("the model config names no 'dataset' and no 'classes'; pass dataset= (e.g. 'synthetic')")


def build_model(cfg: dict, dataset_info: DatasetInfo, text_embeddings: torch.Tensor | None = None) -> nn.Module:
    """Build the backend named by ``cfg['backend']`` for ``dataset_info``'s classes.

    ``cfg`` may be raw or already resolved; it is resolved (defaults merged, validated) here.
    ``text_embeddings`` (num_classes, D) are the class-name embeddings of the text teacher
    (see ``models/text_teacher.py``), for backends that use language guidance.
    """
    resolved = resolve_model_config(cfg)
    return backend_spec(resolved["backend"]).factory(resolved, dataset_info, text_embeddings)


def check_rgbt_inputs(rgb, thermal, valid, backend: str, multiple: int = 32) -> None:
    """The forward contract's shapes: rgb (B, 3, H, W), thermal (B, 1, H, W), valid (B, 1, H, W) or None."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must be (B, 3, H, W), got {tuple(rgb.shape)}")
    b, _, h, w = rgb.shape
    if tuple(thermal.shape) != (b, 1, h, w):
        raise ValueError(f"thermal must be (B, 1, H, W) = {(b, 1, h, w)}, got {tuple(thermal.shape)}")
    if valid is not None and tuple(valid.shape) != (b, 1, h, w):
        raise ValueError(f"valid must be (B, 1, H, W) = {(b, 1, h, w)} or None, got {tuple(valid.shape)}")
    if h % multiple or w % multiple:
        raise ValueError(f"{backend} input height and width must be multiples of {multiple}, got {h}x{w}")


def refuse_frozen_random(cfg: dict, micro_config: str, parts: tuple[tuple[str, str], ...]) -> None:
    """Refuse freezing a part that has no base weights: a frozen random network cannot learn.

    ``parts`` are (section, key) pairs of ``cfg``, e.g. ``(("encoder", "freeze"),)``.
    """
    if cfg["encoder"].get("checkpoint"):
        return
    for section, key in parts:
        if cfg[section][key]:
            raise ValueError(
                f"{section}.{key} is true but encoder.checkpoint is not set: a frozen random network cannot learn. "
                "Give the official SAM2 checkpoint (e.g. sam2.1_hiera_tiny.pt) or set it to false "
                f"(as {micro_config} does)."
            )
