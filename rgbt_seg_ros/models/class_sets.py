"""Class sets: the label spaces one model can segment with (docs/class_sets.md).

A backend that classifies pixels against class-name text embeddings (``segrgbx``) can hold
several class sets in one checkpoint, e.g. MFNet's 9 classes and PST900's 5: its model config
names the primary set in ``classes`` (or ``dataset``) and the others in ``class_sets``
(``{set name: DatasetInfo.to_dict()}``). Such a model answers ``class_set_names`` (primary
first), ``active_class_set``, ``select_class_set(name)`` and ``class_set_info(name)``.
Every other backend has one set: the DatasetInfo it was built for.

This module is the one place generic code (Segmenter, trainer, node, tools) asks those
questions, so that a one-set backend and a several-set backend look the same from outside.
No ROS and no training imports.
"""

from __future__ import annotations

from collections.abc import Callable

from .classes import DatasetInfo, load_dataset_info


class ClassSetError(ValueError):
    """A class set the model does not have; the text names the model's sets."""


def has_class_sets(model) -> bool:
    """True for a backend that can switch class sets (``select_class_set``)."""
    return callable(getattr(model, "select_class_set", None))


def class_set_names(model, info: DatasetInfo) -> tuple[str, ...]:
    """The model's class sets, primary first; ``(info.name,)`` for a one-set backend."""
    if has_class_sets(model):
        return tuple(model.class_set_names)
    return (info.name,)


def active_class_set(model, info: DatasetInfo) -> str:
    """The set the model's ``logits`` are in now."""
    return str(model.active_class_set) if has_class_sets(model) else info.name


def unknown_set_message(name: str, known, what: str) -> str:
    return f"{what} has no class set '{name}'; its class sets are {', '.join(repr(k) for k in known)}"


def select_class_set(model, info: DatasetInfo, name: str | None, what: str = "the model") -> DatasetInfo:
    """Make ``name`` the model's active set and return its DatasetInfo (names, palette, ignore index).

    ``name`` None or empty: ``info``'s set when the model has it, else the primary; never whatever another
    user of the same model selected last. ``info`` is the DatasetInfo the caller has for the model. A one-set
    backend knows only ``info.name``;
    any other name raises :class:`ClassSetError` naming the sets there are (``what`` names the model,
    e.g. the checkpoint directory).
    """
    if not has_class_sets(model):
        if name and name != info.name:
            backend = type(model).__name__
            raise ClassSetError(unknown_set_message(name, (info.name,), f"{what} ({backend}, one class set)"))
        return info
    if not name:  # the set the caller built the model for (the primary unless it names another of the model's)
        name = info.name if info.name in tuple(model.class_set_names) else model.class_set_names[0]
    known = tuple(model.class_set_names)
    if name not in known:
        raise ClassSetError(unknown_set_message(name, known, what))
    model.select_class_set(name)
    return model.class_set_info(name)


def config_class_sets(model_cfg: dict, primary: DatasetInfo | None = None) -> dict[str, DatasetInfo]:
    """The class sets a model config describes, primary first: ``{name: DatasetInfo}``.

    ``primary``: the primary set when the caller already has it (e.g. ``model.dataset`` of the node),
    else the config's ``classes`` or ``dataset``. A checkpoint's ``config.yaml`` ``model`` section is such a
    config, so this tells which sets a checkpoint has without building the model.
    """
    if primary is None:
        if model_cfg.get("classes"):
            primary = DatasetInfo.from_dict(model_cfg["classes"], source="model config 'classes'")
        elif model_cfg.get("dataset"):
            primary = load_dataset_info(model_cfg["dataset"])
        else:
            raise ValueError("the model config names no 'classes' and no 'dataset': it has no class set")
    sets = {primary.name: primary}
    extra = model_cfg.get("class_sets") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"model config 'class_sets' must map set names to class lists, got {type(extra).__name__}")
    for name, data in extra.items():
        if isinstance(data, dict) and "name" not in data:
            data = {"name": name, **data}
        info = DatasetInfo.from_dict(data, source=f"model config class_sets.{name}")
        if name in sets:
            raise ValueError(f"model config class_sets.{name}: the primary class set already has that name")
        if info.name != name:
            raise ValueError(f"model config class_sets.{name} holds classes named '{info.name}'; the names must agree")
        sets[name] = info
    return sets


def text_embeddings_for(model_cfg: dict, primary: DatasetInfo, encode: Callable):
    """Class-name embeddings in the form ``build_model`` takes: ``encode(class_names)`` (a (K, D) tensor)
    for a one-set config; ``{set name: encode(names)}`` for every set when the config has ``class_sets``."""
    sets = config_class_sets(model_cfg, primary)
    if len(sets) == 1:
        return encode(primary.class_names)
    return {name: encode(info.class_names) for name, info in sets.items()}


def random_text_embeddings(model_cfg: dict, primary: DatasetInfo):
    """Random unit-norm class-name embeddings in ``build_model``'s form, for random-weight models (benchmarks):
    no text encoder is loaded. A one-set config draws exactly what ``randn(K, text_dim)`` would."""
    import torch

    text_dim = int((model_cfg.get("language") or {}).get("text_dim", 384))
    return text_embeddings_for(
        model_cfg, primary, lambda names: torch.nn.functional.normalize(torch.randn(len(names), text_dim), dim=-1)
    )
