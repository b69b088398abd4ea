"""``rgbt-seg experiments``: the training experiments behind the evidence tables (not part of ``make test``).

    rgbt-seg experiments evidence --out runs/evidence --seeds 0 1 2 [--variants ...]
    rgbt-seg experiments loss-sweep --out runs/loss_sweep --config models/sartm_micro.yaml --seeds 0 1 2
    rgbt-seg experiments table [--check]
    rgbt-seg experiments demo-card --checkpoint models/demo --run runs/demo
    rgbt-seg experiments realdata --out runs/realdata --realdata DIR
    rgbt-seg experiments step-bench --config models/sartm_micro.yaml --size 480 640 --batch 2

What each one does is in ``rgbt_seg_ros/training/experiments.py`` and ``training/evidence.py``;
docs/training.md has the figures. A training command: this is one of the modules allowed to import
``training/`` (docs/architecture.md, "Import rules").
"""

from __future__ import annotations

import argparse
import os

from ..evaluation.reports import add_table_arguments
from ..training import evidence, experiments, loss_sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="EXPERIMENT")
    e = sub.add_parser("evidence", help="backends and SARTM ablation, per seed, tested with and without thermal")
    e.add_argument("--out", required=True, help="run directories (checkpoints, evaluation reports)")
    e.add_argument(
        "--results", default=str(evidence.RESULTS), help="result JSON folder (default docs/results/learning)"
    )
    e.add_argument("--variants", nargs="*", choices=list(evidence.VARIANTS), default=list(evidence.VARIANTS))
    e.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    e.add_argument("--steps", type=int, default=500)
    e.add_argument("--batch", type=int, default=8)
    e.add_argument("--scenes", type=int, default=500, help="training scenes (rendered once per process)")
    e.add_argument("--size", type=int, nargs=2, default=[96, 128], help="model input size")
    e.add_argument("--test-count", type=int, default=128)
    e.add_argument("--rerun", action="store_true", help="train runs whose result file exists again")
    e.add_argument("--no-progress", action="store_true")
    w = sub.add_parser("loss-sweep", help="SARTM's loss weights: w2, w3 and the language warm-up, per seed")
    w.add_argument("--out", required=True, help="run directories (checkpoints, evaluation reports)")
    w.add_argument("--results", default=str(loss_sweep.RESULTS), help="result JSON folder")
    w.add_argument("--config", default="models/sartm_micro.yaml", help="a SARTM model config")
    w.add_argument("--arms", nargs="*", choices=list(loss_sweep.arms()), help="default: every arm")
    w.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    w.add_argument("--steps", type=int, default=200)
    w.add_argument("--batch", type=int, default=4)
    w.add_argument("--scenes", type=int, default=200, help="training scenes (rendered once per process)")
    w.add_argument("--size", type=int, nargs=2, default=[96, 128], help="model input size")
    w.add_argument("--test-count", type=int, default=64)
    w.add_argument("--rerun", action="store_true", help="train runs whose result file exists again")
    w.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("table", help="the learning tables in README and docs/ from docs/results/learning")
    add_table_arguments(t, evidence.RESULTS, "tables")
    d = sub.add_parser("demo-card", help="evaluate the demo checkpoint at camera size, write its metrics.json")
    d.add_argument("--checkpoint", default=str(evidence.DEMO_METRICS.parent))
    d.add_argument("--run", help="the training run directory (its summary.json goes into the card)")
    d.add_argument("--out", default=str(evidence.DEMO_METRICS))
    d.add_argument("--test-count", type=int, default=128)
    r = sub.add_parser("realdata", help="train on the PST900 sample and the MFNet tiles; training mIoU")
    r.add_argument("--out", required=True)
    r.add_argument("--config", default="models/sartm_micro.yaml")
    r.add_argument(
        "--realdata", required=True, help="folder holding pst900/sample_102 and mfnet_figure_tiles (read, not copied)"
    )
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--runs", nargs="*", choices=list(experiments.REALDATA_RUNS))
    r.add_argument("--val-every", type=int, default=1_000_000, help="epochs between validations (default: at the end)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/NAME/last (--steps: new total)")
    s = sub.add_parser("step-bench", help="training step time and peak memory on random data")
    s.add_argument("--config", default="models/sartm_micro.yaml")
    s.add_argument("--dataset", default=None)
    s.add_argument("--size", type=int, nargs=2, default=[480, 640])
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--random-init", action="store_true", help="unfreeze encoder and decoder (no SAM2 weights)")
    for q in (e, r, d, w):
        q.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    runs = {
        "evidence": evidence.run_evidence,
        "loss-sweep": loss_sweep.run_sweep,
        "table": experiments.run_table,
        "demo-card": experiments.run_demo_card,
        "realdata": experiments.run_realdata,
        "step-bench": experiments.run_step_bench,
    }
    return runs[args.what](args)
