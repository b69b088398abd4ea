"""``rgbt-seg train``: train a model config on a dataset (see ``rgbt_seg_ros/training/trainer.py``).

Single process::

    rgbt-seg train --config models/sartm_tiny.yaml --dataset mfnet --data ~/data/MFNet --out runs/mfnet \\
        --sam2-checkpoint ~/models/sam2/sam2.1_hiera_tiny.pt --epochs 50 --batch-size 2

Several GPUs or nodes (one process per GPU; ``--batch-size`` is per process)::

    torchrun --nproc_per_node 4 --no-python rgbt-seg train --config ... --out runs/mfnet

``--train-config FILE.yaml`` sets any key of ``TRAIN_DEFAULTS`` (flags given on the command line
win); ``--resume`` continues ``OUT/last`` with the run's saved configs (flags given override them).
Several datasets at once (a backend with class sets, e.g. segrgbx): a train config with ``datasets``
instead of ``--dataset`` (docs/class_sets.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="model config YAML (e.g. models/sartm_tiny.yaml); optional with --resume")
    p.add_argument("--dataset", help="dataset kind: pst900 | mfnet | fmb | folder | synthetic")
    p.add_argument("--data", help="dataset root folder (not needed for synthetic)")
    p.add_argument("--classes", help="class file name or YAML path (default: the dataset's; folder needs it)")
    p.add_argument("--out", required=True, type=Path, help="run directory (last/, best/, metrics.jsonl)")
    p.add_argument("--train-config", type=Path, help="YAML with train-config keys (see trainer.TRAIN_DEFAULTS)")
    p.add_argument("--sam2-checkpoint", help="official SAM2 weights sam2.1_hiera_*.pt (overrides the config)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="total optimiser steps (default: epochs x steps per epoch)")
    p.add_argument("--stop-after-steps", type=int, help="stop (saving last/) after N steps; schedule unchanged")
    p.add_argument("--batch-size", type=int, help="batch size per process (default 2)")
    p.add_argument("--optimizer", choices=("adamw", "adam"), help="optimiser (default: the backend's recipe)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the backend's recipe; SARTM 1e-4)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: the backend's recipe; SARTM 0.01)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 5%% of the steps)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient L2 norm to this value")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision on CUDA (default fp32)")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default 0)")
    p.add_argument("--val-every", type=int, help="epochs between validations (default 1)")
    p.add_argument("--val-split", help="validation split (default val; 'none' for no validation)")
    p.add_argument("--modalities", choices=("rgbt", "rgb"), help="rgb: train and validate with thermal blanked")
    p.add_argument("--loss-weights", type=float, nargs=4, metavar=("W0", "W1", "W2", "W3"))
    p.add_argument("--synthetic-count", type=int, help="synthetic: training scenes (default 64)")
    p.add_argument("--synthetic-val-count", type=int, help="synthetic: validation scenes (default: as training)")
    p.add_argument("--synthetic-seed", type=int, help="synthetic: scene seed (default 0)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="synthetic: camera size of the scenes (default 480 640); fitted to the model like a camera frame",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last (exactly: weights, optimizer, RNG)")


def _load_yaml(path: Path) -> dict:
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: file does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of train-config keys, got {type(data).__name__}")
    return data


def _legacy_defaults(saved: dict, saved_model: Path) -> dict:
    """A run saved before per-backend recipes and camera-size synthetic scenes resumes as it started:
    AdamW with OHEM (the one recipe then), synthetic scenes rendered at the model's input size."""
    if "optimizer" in saved:
        return saved
    saved = dict(saved)
    saved["optimizer"] = "adamw"
    saved["loss"] = {**(saved.get("loss") or {}), "kind": "ohem"}
    if saved.get("dataset") == "synthetic" and not (saved.get("dataset_options") or {}).get("size"):
        size = _load_yaml(saved_model).get("input_size") if saved_model.is_file() else None
        if size:
            saved["dataset_options"] = {**(saved.get("dataset_options") or {}), "size": list(size)}
    return saved


def build_train_config(args: argparse.Namespace, base: dict | None = None) -> dict:
    """Train-config dict from ``--train-config`` (or a resumed run's saved config) and the flags."""
    cfg = dict(base or {})
    if args.train_config:
        cfg.update(_load_yaml(args.train_config))
    flags = {
        "dataset": args.dataset,
        "data": args.data,
        "classes": args.classes,
        "sam2_checkpoint": args.sam2_checkpoint,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "stop_after_steps": args.stop_after_steps,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "grad_clip": args.grad_clip,
        "device": args.device,
        "precision": args.precision,
        "seed": args.seed,
        "num_workers": args.num_workers,
        "val_every": args.val_every,
        "modalities": args.modalities,
    }
    cfg.update({k: v for k, v in flags.items() if v is not None})
    if args.val_split is not None:
        cfg["val_split"] = None if args.val_split.lower() == "none" else args.val_split
    if args.loss_weights is not None:
        cfg["loss"] = {**(cfg.get("loss") or {}), "weights": list(args.loss_weights)}
    if args.no_progress:
        cfg["progress"] = False
    opts = dict(cfg.get("dataset_options") or {})
    for key, value in (("count", args.synthetic_count), ("seed", args.synthetic_seed), ("size", args.size)):
        if value is not None:
            opts[key] = list(value) if key == "size" else value
    if opts:
        cfg["dataset_options"] = opts
    if args.synthetic_val_count is not None:
        cfg["val_dataset_options"] = {**(cfg.get("val_dataset_options") or {}), "count": args.synthetic_val_count}
    return cfg


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..data.datasets import DatasetError
    from ..training.trainer import MODEL_CONFIG_FILE, TRAIN_CONFIG_FILE, TrainConfigError, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    model_config = args.config
    base = None
    if args.resume:
        saved_train = args.out / TRAIN_CONFIG_FILE
        saved_model = args.out / MODEL_CONFIG_FILE
        if not saved_train.is_file() and not args.train_config and not args.dataset:
            print(f"error: --resume: {saved_train} does not exist; is {args.out} a run directory?", file=sys.stderr)
            return 2
        if saved_train.is_file():
            base = _legacy_defaults(_load_yaml(saved_train), saved_model)
            base.pop("stop_after_steps", None)
        if model_config is None and saved_model.is_file():
            model_config = str(saved_model)
    if model_config is None:
        print("error: --config is required (a model YAML such as models/sartm_tiny.yaml)", file=sys.stderr)
        return 2
    try:
        cfg = build_train_config(args, base)
        if not cfg.get("dataset") and not cfg.get("datasets"):
            print(
                "error: --dataset is required (pst900, mfnet, fmb, folder or synthetic), or a --train-config with "
                "'datasets' (joint training over several datasets, docs/class_sets.md)",
                file=sys.stderr,
            )
            return 2
        trainer = Trainer(model_config, cfg, args.out, resume=args.resume)
    except (TrainConfigError, DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.dist.is_main:
        print(trainer.recipe_line, flush=True)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        best = summary.get("best_miou")
        print(
            f"trained {summary['steps']}/{summary['total_steps']} steps in {summary['wall_s']:.0f} s "
            f"(median step {summary['step_time_s_median'] or 0:.3f} s, peak RSS {summary['peak_rss_mb']:.0f} MB); "
            + (f"best val mIoU {100 * best:.2f} %; " if best is not None else "")
            + f"checkpoints in {args.out}/last"
            + (f" and {args.out}/best" if best is not None else "")
        )
    return 0


if __name__ == "__main__":  # python -m rgbt_seg_ros.tools.train ... (same as rgbt-seg train ...)
    parser = argparse.ArgumentParser(prog="rgbt-seg train", description="train an RGB-T segmentation model")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
