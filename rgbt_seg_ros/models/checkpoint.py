"""Trained-model checkpoints: a directory with ``model.safetensors`` and ``config.yaml``.

``model.safetensors``
    Every tensor of the model that does not come frozen from the SAM2 base weights: LoRA,
    fusion, language and heads, the class-name text buffer, BatchNorm statistics, and the
    whole encoder when it was trained from scratch (the micro config). Its metadata names the
    backend and the class count.
``config.yaml``
    ``format``, ``backend``, ``model`` (the resolved model config), ``classes``
    (``DatasetInfo.to_dict()``: names, palette, ignore index; the primary class set of a model
    with several, whose others travel in ``model.class_sets``), ``input_size``,
    ``normalization`` and ``base_weights``: the SAM2 config, the path and sha256 of the base
    weights file it was trained on (null when the model needs none).
``base_sam2.safetensors`` (only in a standalone export)
    The frozen base tensors in the official SAM2 key layout, so the directory runs without
    the original ``sam2.1_hiera_*.pt``.

Loading never unpickles: safetensors for our files, ``torch.load(weights_only=True)`` for an
official SAM2 file. A checkpoint whose backend, class count or tensor names do not match
fails with a message naming the file and the keys.

Format 2 added the tensors named in :data:`ADDED_SINCE_FORMAT_1` (SAM2's ``no_mem_embed``,
added to the image embedding before the mask decoder). A format-1 checkpoint lacks them and
ran with them at zero: they load as zeros, also where the base weights file has them, so an
old model computes what it computed when it was trained. Any other missing key is refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml
from torch import nn

from .classes import DatasetInfo
from .registry import backend_spec, build_model, resolve_model_config
from .sam2_checkpoint import file_sha256

CHECKPOINT_FORMAT = "rgbt_seg_ros.checkpoint/2"
FORMAT_1 = "rgbt_seg_ros.checkpoint/1"
READABLE_FORMATS = (FORMAT_1, CHECKPOINT_FORMAT)
#: State-dict keys format 1 did not have; a format-1 checkpoint loads them as zeros.
ADDED_SINCE_FORMAT_1 = ("sam_head.no_mem_embed",)
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
BASE_FILE = "base_sam2.safetensors"
_MAX_NAMED = 10


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else ""
    return ", ".join(keys[:_MAX_NAMED]) + more


def _frozen_base_keys(model: nn.Module) -> list[str]:
    getter = getattr(model, "frozen_base_state_keys", None)
    return list(getter()) if callable(getter) else []


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the state dict minus frozen base-weight tensors."""
    frozen = set(_frozen_base_keys(model))
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if k not in frozen}


def save_checkpoint(
    model: nn.Module,
    cfg: dict,
    dataset_info: DatasetInfo,
    out_dir: str | Path,
    base_weights_path: str | Path | None = None,
    standalone: bool = False,
) -> Path:
    """Write ``model`` as a checkpoint directory ``out_dir`` (created; existing files replaced).

    ``base_weights_path`` is the SAM2 file the model was built on (default: the config's
    ``encoder.checkpoint``); its sha256 is recorded. ``standalone`` also writes the frozen base
    tensors (official key layout) into the directory.
    """
    from safetensors.torch import save_file

    resolved = resolve_model_config(cfg)
    _check_class_sets(model, resolved, dataset_info)
    num_classes = dataset_info.num_classes
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    frozen = _frozen_base_keys(model)
    base_path = base_weights_path or (resolved.get("encoder") or {}).get("checkpoint")
    base_record = None
    if frozen:
        if base_path is None and not standalone:
            raise ValueError(
                "the model holds frozen SAM2 base weights but no base_weights_path is known; pass the "
                "sam2.1_hiera_*.pt it was built on, or standalone=True"
            )
        base_record = {
            "sam2_config": resolved.get("encoder", {}).get("sam2_config"),
            "source": str(Path(base_path).expanduser().resolve()) if base_path else None,
            "sha256": file_sha256(base_path) if base_path else None,
        }
        if standalone:
            exporter = getattr(model, "sam2_state_dict", None)
            if not callable(exporter):
                raise ValueError(f"backend '{resolved['backend']}' cannot export its base weights (standalone=True)")
            save_file(
                {k: v.contiguous() for k, v in exporter().items()},
                str(out / BASE_FILE),
                metadata={"format": "sam2-official-layout"},
            )
            base_record["file"] = BASE_FILE
            base_record["file_sha256"] = file_sha256(out / BASE_FILE)
    elif (out / BASE_FILE).exists():
        (out / BASE_FILE).unlink()

    tensors = trained_state_dict(model)
    save_file(
        tensors,
        str(out / MODEL_FILE),
        metadata={"format": CHECKPOINT_FORMAT, "backend": resolved["backend"], "num_classes": str(num_classes)},
    )
    model_cfg = copy.deepcopy(resolved)
    if "encoder" in model_cfg:
        model_cfg["encoder"]["checkpoint"] = None  # found through base_weights on load
    model_cfg.pop("dataset", None)
    model_cfg["classes"] = dataset_info.to_dict()
    config = {
        "format": CHECKPOINT_FORMAT,
        "backend": resolved["backend"],
        "classes": dataset_info.to_dict(),
        "input_size": list(resolved["input_size"]),
        "normalization": copy.deepcopy(resolved["normalization"]),
        "base_weights": base_record,
        "tensors": {"file": MODEL_FILE, "count": len(tensors)},
        "model": model_cfg,
    }
    with open(out / CONFIG_FILE, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False, default_flow_style=None)
    return out


def _check_class_sets(model: nn.Module, resolved: dict, dataset_info: DatasetInfo) -> None:
    """A model with several class sets is saved with its primary set as ``classes`` and the others in the
    config's ``class_sets`` (so that loading rebuilds the same sets): refuse anything else."""
    from .class_sets import has_class_sets

    if not has_class_sets(model):
        return
    names = tuple(model.class_set_names)
    primary = model.class_set_info(names[0])
    if dataset_info.name != primary.name or tuple(dataset_info.class_names) != tuple(primary.class_names):
        raise ValueError(
            f"save_checkpoint: dataset_info is class set '{dataset_info.name}' but the model's primary class set is "
            f"'{primary.name}'; save with the primary set's DatasetInfo (model.class_set_info('{primary.name}'))"
        )
    listed = tuple(resolved.get("class_sets") or {})
    if set(listed) != set(names[1:]):
        raise ValueError(
            f"save_checkpoint: the model has class sets {list(names)} but the config's class_sets list "
            f"{list(listed)} besides the primary '{primary.name}'"
        )


def checkpoint_class_sets(ckpt_dir: str | Path) -> tuple[str, ...]:
    """The class sets a checkpoint can segment with, primary first, read from its ``config.yaml`` (no model
    is built): the ``classes`` name, then the model config's ``class_sets``."""
    from .class_sets import config_class_sets

    config = read_checkpoint_config(ckpt_dir)
    primary = DatasetInfo.from_dict(config["classes"], source=str(Path(ckpt_dir) / CONFIG_FILE))
    return tuple(config_class_sets(config["model"], primary))


def check_checkpoint_class_set(ckpt_dir: str | Path, name: str) -> None:
    """Raise ``ClassSetError`` naming the checkpoint's sets when it has no class set ``name`` (no model is built)."""
    from .class_sets import ClassSetError, unknown_set_message

    known = checkpoint_class_sets(ckpt_dir)
    if name not in known:
        raise ClassSetError(unknown_set_message(name, known, f"checkpoint {ckpt_dir}"))


def read_checkpoint_config(ckpt_dir: str | Path) -> dict:
    """Read and check ``config.yaml`` of a checkpoint directory."""
    d = Path(ckpt_dir).expanduser()
    path = d / CONFIG_FILE
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a checkpoint directory holds {CONFIG_FILE} and {MODEL_FILE}")
    with open(path) as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML (damaged checkpoint?): {exc}") from None
    if not isinstance(config, dict) or config.get("format") not in READABLE_FORMATS:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: expected format {' or '.join(map(repr, READABLE_FORMATS))}, found {found!r}")
    for key in ("backend", "classes", "model"):
        if key not in config:
            raise ValueError(f"{path}: missing key '{key}'")
    if config["model"].get("backend") != config["backend"]:
        raise ValueError(
            f"{path}: backend '{config['backend']}' differs from model.backend '{config['model'].get('backend')}'"
        )
    return config


def _base_weights_file(d: Path, record: dict, sam2_checkpoint: str | Path | None) -> Path:
    """The base-weights file for a checkpoint: standalone copy, the given file, or the recorded source."""
    if record.get("file"):
        p = d / record["file"]
        if not p.is_file():
            raise FileNotFoundError(f"{d / CONFIG_FILE} names base weights {record['file']}, which is missing")
        if record.get("file_sha256") and file_sha256(p) != record["file_sha256"]:
            raise ValueError(f"{p} does not match the sha256 recorded in {d / CONFIG_FILE}; the file is damaged")
        return p
    candidates = [Path(sam2_checkpoint).expanduser()] if sam2_checkpoint else []
    if not candidates and record.get("source"):
        candidates.append(Path(record["source"]))
    if not candidates or not candidates[0].is_file():
        raise FileNotFoundError(
            f"checkpoint {d} was trained on SAM2 weights {record.get('sam2_config')} "
            f"(sha256 {record.get('sha256')}, originally {record.get('source')}); that file was not found. "
            "Pass sam2_checkpoint=<path to the same file>."
        )
    p = candidates[0]
    digest = file_sha256(p)
    if record.get("sha256") and digest != record["sha256"]:
        raise ValueError(
            f"SAM2 weights {p} (sha256 {digest[:12]}...) are not the ones checkpoint {d} was trained on "
            f"(sha256 {record['sha256'][:12]}...)"
        )
    return p


def load_checkpoint(
    ckpt_dir: str | Path,
    device: str | torch.device = "cpu",
    sam2_checkpoint: str | Path | None = None,
    backend: str | None = None,
) -> tuple[nn.Module, dict, DatasetInfo]:
    """Load a checkpoint directory -> ``(model in eval mode on device, resolved cfg, dataset_info)``.

    ``sam2_checkpoint`` overrides where the base SAM2 weights are read from (checked against
    the recorded sha256). ``backend``, if given, is the backend the caller expects.
    """
    from safetensors import safe_open

    d = Path(ckpt_dir).expanduser()
    config = read_checkpoint_config(d)
    name = config["backend"]
    if backend is not None and backend != name:
        raise ValueError(f"{d / CONFIG_FILE}: checkpoint backend is '{name}', expected '{backend}'")
    backend_spec(name)  # unknown backend -> error listing the registered ones
    dataset_info = DatasetInfo.from_dict(config["classes"], source=str(d / CONFIG_FILE))
    cfg = copy.deepcopy(config["model"])
    cfg["classes"] = config["classes"]

    tensor_path = d / MODEL_FILE
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{tensor_path} does not exist")
    try:
        with safe_open(str(tensor_path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises SafetensorError (not a ValueError) for damaged files
        raise ValueError(f"{tensor_path} is not a readable safetensors file (truncated or damaged?): {exc}") from None
    if meta.get("backend") not in (None, name):
        raise ValueError(f"{tensor_path} holds a '{meta['backend']}' model but {CONFIG_FILE} says '{name}'")
    if meta.get("num_classes") is not None and int(meta["num_classes"]) != dataset_info.num_classes:
        raise ValueError(
            f"{tensor_path} was trained for {meta['num_classes']} classes but {d / CONFIG_FILE} lists "
            f"{dataset_info.num_classes} ({', '.join(dataset_info.class_names)})"
        )

    record = config.get("base_weights")
    if record:
        cfg.setdefault("encoder", {})["checkpoint"] = str(_base_weights_file(d, record, sam2_checkpoint))
    resolved = resolve_model_config(cfg)
    model = build_model(resolved, dataset_info)

    frozen = set(_frozen_base_keys(model))
    state = model.state_dict()
    zeros = {}
    if config["format"] == FORMAT_1:  # zeros, as the model ran then (even if the base file has them)
        zeros = {k: torch.zeros_like(state[k]) for k in ADDED_SINCE_FORMAT_1 if k in state and k not in tensors}
    expected = {k: v for k, v in state.items() if k not in frozen}
    missing = set(expected) - set(tensors) - set(zeros)
    unexpected = set(tensors) - set(expected)
    tensors |= zeros
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {_names(unexpected)}")
        raise ValueError(f"{tensor_path} does not fit the '{name}' model of {d / CONFIG_FILE}: " + "; ".join(parts))
    wrong = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if tensors[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{tensor_path}: tensor shape(s) differ from the model (file vs model): {_names(wrong)}")
    model.load_state_dict(tensors, strict=False)
    model.to(device).eval()
    return model, resolved, dataset_info


def export_standalone(ckpt_dir: str | Path, out_dir: str | Path, sam2_checkpoint: str | Path | None = None) -> Path:
    """Copy a checkpoint into ``out_dir`` together with its base weights (no external file needed)."""
    model, cfg, info = load_checkpoint(ckpt_dir, "cpu", sam2_checkpoint=sam2_checkpoint)
    config = read_checkpoint_config(ckpt_dir)
    out = Path(out_dir).expanduser()
    if out.resolve() == Path(ckpt_dir).expanduser().resolve():
        raise ValueError("export_standalone: out_dir must differ from the checkpoint directory")
    save_checkpoint(model, cfg, info, out, base_weights_path=None, standalone=True)
    record = config.get("base_weights")
    if record:  # keep the identity of the original base file
        written = read_checkpoint_config(out)
        written["base_weights"].update({k: record.get(k) for k in ("source", "sha256")})
        with open(out / CONFIG_FILE, "w") as f:
            yaml.safe_dump(written, f, sort_keys=False, default_flow_style=None)
    return out
