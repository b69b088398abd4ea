"""The training evidence behind the backend and ablation tables (README, docs/training.md): runs, results, tables.

    rgbt-seg experiments evidence --out runs/evidence --seeds 0 1 2
    rgbt-seg experiments table [--check]
    rgbt-seg experiments demo-card --checkpoint models/demo --run runs/demo

A **variant** is a micro model config plus train-config overrides (:data:`VARIANTS`): the four
backends with their own recipes (micro lr 1e-3), SARTM without thermal, without its auxiliary
head and without its language losses, SegRGB-X without each of its parts, and the four backends
trained with modality dropout (``transform.modality_dropout`` p_rgb 0.2, p_thermal 0.2). Every run
of every variant has the same budget (steps, batch, training scenes, input size); only the training
seed differs between the runs of a variant.

A run trains from scratch on synthetic scenes rendered at camera size (640x480) and fitted to the
model like camera frames, then evaluates its last checkpoint through the Segmenter on the held-out
synthetic ``test`` split at camera size, with thermal, with thermal blanked (thermal 0, valid
false: what the node does without a thermal camera) and with RGB blanked (test mode
``thermal_only``: RGB black, labels unseen by the thermal camera are misses: what the node publishes
with ``on_rgb_loss: thermal_only``). Its figures are written at once to
``RESULTS/<variant>_seed<k>.json`` (committed under ``docs/results/learning/``), so a stopped
experiment keeps every finished run. ``table`` writes the tables between their markers (in README.md or docs/) from
those files (median and range over the seeds, never typed by hand); ``--check`` fails when a table
differs from the files (a test runs it). ``demo-card`` evaluates the demo checkpoint the same way and
writes ``models/demo/metrics.json``, from which the demo table (docs/training.md) is generated too.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from pathlib import Path

import numpy as np

from ..evaluation.reports import holder, load_numbered, spread, update_blocks, write_each
from .losses import DEFAULT_LOSS_PRESET, LOSS_PRESETS

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "learning"

_W = LOSS_PRESETS[DEFAULT_LOSS_PRESET]["weights"]

#: name -> (model config, train-config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "sartm": ("models/sartm_micro.yaml", {}),
    "cpal": ("models/cpal_micro.yaml", {}),
    "fusionsam": ("models/fusionsam_micro.yaml", {}),
    "sartm_rgb_only": ("models/sartm_micro.yaml", {"modalities": "rgb"}),
    # the default loss (the calibrated preset) with one part off, and the paper's weights instead
    "sartm_no_aux_head": (
        "models/sartm_micro.yaml",
        {"model": {"output": {"combine": "s0"}}, "loss": {"weights": [_W[0], 0.0, _W[2], _W[3]]}},
    ),
    "sartm_no_language_losses": ("models/sartm_micro.yaml", {"loss": {"weights": [_W[0], _W[1], 0.0, 0.0]}}),
    "sartm_paper_weights": ("models/sartm_micro.yaml", {"loss": {"preset": "paper"}}),
    "segrgbx": ("models/segrgbx_micro.yaml", {}),
    # the paper's Table VI: one part off at a time
    "segrgbx_no_ma_clip": ("models/segrgbx_micro.yaml", {"model": {"ma_clip": {"enabled": False}}}),
    "segrgbx_no_aligned_prompts": ("models/segrgbx_micro.yaml", {"model": {"prompts": {"aligned_tokens": 0}}}),
    "segrgbx_no_dsrm": ("models/segrgbx_micro.yaml", {"model": {"dsrm": {"enabled": False}}}),
    # the head: the cosine-to-class-name classifier (for joint label spaces) on the one label space
    "segrgbx_cosine_head": ("models/segrgbx_micro.yaml", {"model": {"head": {"classifier": "cosine"}}}),
    # trained for a lost camera: one modality blanked in 40 % of the training items (docs/training.md, thermal-only)
    **{
        f"{name}_modality_dropout": (
            f"models/{name}_micro.yaml",
            {"transform": {"modality_dropout": {"p_rgb": 0.2, "p_thermal": 0.2}}},
        )
        for name in ("sartm", "cpal", "fusionsam", "segrgbx")
    },
}
BACKEND_ROWS = {"sartm": "SARTM", "cpal": "CPAL", "fusionsam": "FusionSAM", "segrgbx": "SegRGB-X"}
ABLATION_ROWS = {
    "sartm": f"RGB-T, the default loss ({DEFAULT_LOSS_PRESET} preset: w1 {_W[1]:g}, w2 {_W[2]:g}, w3 {_W[3]:g})",
    "sartm_rgb_only": "RGB only (thermal blanked in training and test)",
    "sartm_no_aux_head": "without the auxiliary head (`logits = S0`, w1 = 0)",
    "sartm_no_language_losses": "without the language losses (w2 = w3 = 0)",
    "sartm_paper_weights": "the paper's loss weights (Table VII: 1, 0.008, 1e4, 100)",
}
SEGRGBX_ABLATION_ROWS = {
    "segrgbx": "all parts (MA-CLIP guidance, modality-aligned prompts, DSRM)",
    "segrgbx_no_ma_clip": "without MA-CLIP (no control prompts; DSRM queries from its own features)",
    "segrgbx_no_aligned_prompts": "without the modality-aligned prompts",
    "segrgbx_no_dsrm": "without the DSRM",
    "segrgbx_cosine_head": "all parts, cosine-to-class-name classifier instead of the linear one",
}
THERMAL_ONLY_ROWS = {
    "sartm_modality_dropout": "SARTM",
    "cpal_modality_dropout": "CPAL",
    "fusionsam_modality_dropout": "FusionSAM",
    "segrgbx_modality_dropout": "SegRGB-X",
}
#: test mode -> (blank_thermal, blank_rgb); ``thermal_only`` is missing from result files written before it
TEST_MODES = {"thermal": (False, False), "blank": (True, False), "thermal_only": (False, True)}
CONDITIONS = ("day", "night", "fog", "glare")
NIGHT_CLASSES = ("person", "car")

BACKENDS_BEGIN = (
    "<!-- learning-table backends: generated by `rgbt-seg experiments table` "
    "from docs/results/learning/*.json; do not edit -->"
)
ABLATION_BEGIN = (
    "<!-- learning-table ablation: generated by `rgbt-seg experiments table` "
    "from docs/results/learning/*.json; do not edit -->"
)
THERMAL_ONLY_BEGIN = (
    "<!-- learning-table thermal-only: generated by `rgbt-seg experiments table` "
    "from docs/results/learning/*.json; do not edit -->"
)
SEGRGBX_ABLATION_BEGIN = (
    "<!-- learning-table segrgbx-ablation: generated by `rgbt-seg experiments table` "
    "from docs/results/learning/*.json; do not edit -->"
)
DEMO_BEGIN = (
    "<!-- learning-table demo: generated by `rgbt-seg experiments table` from models/demo/metrics.json; do not edit -->"
)
END = "<!-- learning-table end -->"
DEMO_METRICS = Path(__file__).resolve().parents[2] / "models" / "demo" / "metrics.json"


def budget_config(steps: int, batch: int, scenes: int, input_size: list[int], seed: int, overrides: dict) -> dict:
    """The train config of one run: the shared budget plus the run's overrides."""
    from .trainer import _merge

    base = {
        "dataset": "synthetic",
        "dataset_options": {"count": int(scenes), "seed": 0},  # camera-size scenes (the default size)
        "val_split": None,  # the held-out test split is the measure
        "max_steps": int(steps),
        "batch_size": int(batch),
        "seed": int(seed),
        "log_every": 50,
        "progress": False,
        "model": {"input_size": list(input_size)},
    }
    return _merge(base, overrides)


def train_config(variant: str, steps: int, batch: int, scenes: int, input_size: list[int], seed: int) -> dict:
    """The train config of one run of ``variant``."""
    return budget_config(steps, batch, scenes, input_size, seed, VARIANTS[variant][1])


def _scores(doc: dict) -> dict:
    conds = doc.get("conditions", {})
    night = conds.get("night", {}).get("per_class_iou") or {}
    return {
        "miou": doc["miou"],
        "conditions": {c: conds[c]["miou"] for c in CONDITIONS if c in conds},
        "night_iou": {k: night.get(k) for k in NIGHT_CLASSES},
    }


def run_variant(variant: str, seed: int, args, test_set) -> dict:
    """Train one run of ``variant`` and evaluate it with thermal, with thermal blanked and with RGB blanked;
    returns the result document."""
    config, overrides = VARIANTS[variant]
    return train_and_test(variant, config, overrides, seed, args, test_set)


def train_and_test(name: str, config: str, overrides: dict, seed: int, args, test_set, modes=TEST_MODES) -> dict:
    """Train ``config`` with the budget of ``args`` (steps, batch, scenes, size; run directories under
    ``args.out``) and ``overrides``, then evaluate its last checkpoint on ``test_set`` in each test mode of
    ``modes``; returns the result document."""
    import torch

    from ..evaluation.evaluator import evaluate
    from ..pipeline.segmenter import Segmenter
    from .trainer import Trainer

    run_dir = Path(args.out) / f"{name}_seed{seed}"
    cfg = budget_config(args.steps, args.batch, args.scenes, args.size, seed, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(config, cfg, run_dir)
    recipe = trainer.recipe_line
    summary = trainer.fit()
    trainer.close()
    wall = time.perf_counter() - t0
    seg = Segmenter.from_checkpoint(run_dir / "last", device="cpu", warmup=False)
    tests = {}
    titles = {"thermal": "RGB-T", "blank": "thermal blanked", "thermal_only": "RGB blanked (thermal only)"}
    for mode, (blank_thermal, blank_rgb) in modes.items():
        doc = evaluate(
            seg,
            test_set,
            out_dir=run_dir / f"eval_{mode}",
            blank_thermal=blank_thermal,
            blank_rgb=blank_rgb,
            title=f"{name} seed {seed}, {titles[mode]}",
            progress=False,
        )
        tests[mode] = _scores(doc)
    return {
        "variant": name,
        "config": config,
        "overrides": overrides,
        "seed": seed,
        "steps": summary["steps"],
        "batch": args.batch,
        "train_scenes": args.scenes,
        "input_size": list(args.size),
        "camera_size": list(test_set.size),
        "test_scenes": len(test_set),
        "recipe": recipe,
        "train_wall_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
        "test": tests,
    }


def run_evidence(args) -> int:
    from ..data.datasets import build_dataset
    from ..models.classes import load_dataset_info

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    test_set = build_dataset(
        "synthetic", None, "test", load_dataset_info("synthetic"), count=args.test_count, seed=0, cache=True
    )

    def describe(doc: dict, path: Path) -> str:
        t, b, o = doc["test"]["thermal"], doc["test"]["blank"], doc["test"]["thermal_only"]
        return (
            f"{doc['variant']} seed {doc['seed']}: mIoU {100 * t['miou']:.1f}, "
            f"night {100 * t['conditions']['night']:.1f} "
            f"(thermal blanked {100 * b['conditions']['night']:.1f}, RGB blanked {100 * o['conditions']['night']:.1f})"
            f", {doc['train_wall_s']:.0f} s -> {path}"
        )

    write_each(
        [(v, s) for s in args.seeds for v in args.variants],
        lambda variant, seed: results / f"{variant}_seed{seed}.json",
        lambda variant, seed: run_variant(variant, seed, args, test_set),
        describe,
        rerun=args.rerun,
        progress=not args.no_progress,
        desc="evidence runs",
    )
    return 0


# --------------------------------------------------------------------------- tables


def load_results(results: Path = RESULTS) -> dict[str, list[dict]]:
    """``<variant>_seed<k>.json`` grouped by variant, in seed order."""
    return load_numbered(results, "seed")


def _pct(runs: list[dict], get) -> str:
    vals = [get(r) for r in runs]
    return spread([None if v is None else 100.0 * v for v in vals], 1, noun="seed")


def night_drop(run: dict) -> float:
    """Night mIoU with thermal minus with thermal blanked (fraction)."""
    return run["test"]["thermal"]["conditions"]["night"] - run["test"]["blank"]["conditions"]["night"]


def _recipe(line: str) -> str:
    """``AdamW lr 0.001, ...`` out of a trainer's recipe line (the recipe it trained with)."""
    used = line.split(" -> ")[-1]
    m = re.search(r"\(([^()]*)\)\s*$", used)
    return m.group(1) if m else used.replace("recipe: ", "")


def _median_pct(runs: list[dict], get) -> str:
    vals = [get(r) for r in runs]
    vals = [v for v in vals if v is not None]
    return "n/a" if not vals else f"{100 * float(np.median(vals)):.1f}"


def backends_table(res: dict[str, list[dict]]) -> str:
    lines = [
        "| backend | recipe (micro: lr 1e-3) | test mIoU | night mIoU | night, thermal blanked | night drop | "
        "night person IoU, with / without thermal | night car IoU, with / without thermal |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in BACKEND_ROWS.items():
        runs = res.get(name)
        if not runs:
            continue
        cells = [
            _pct(runs, lambda r: r["test"]["thermal"]["miou"]),
            _pct(runs, lambda r: r["test"]["thermal"]["conditions"]["night"]),
            _pct(runs, lambda r: r["test"]["blank"]["conditions"]["night"]),
            _pct(runs, night_drop),
        ]
        for cls in NIGHT_CLASSES:
            with_t = _median_pct(runs, lambda r, c=cls: r["test"]["thermal"]["night_iou"][c])
            blank = _median_pct(runs, lambda r, c=cls: r["test"]["blank"]["night_iou"][c])
            cells.append(f"{with_t} / {blank}")
        lines.append(f"| {label} | {_recipe(runs[0]['recipe'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", _budget(res, list(BACKEND_ROWS)) + " Person and car IoU: medians."])


def ablation_table(res: dict[str, list[dict]], rows: dict[str, str] = ABLATION_ROWS, title: str = "SARTM") -> str:
    lines = [f"| {title} micro variant | test mIoU | " + " | ".join(CONDITIONS) + " |", "|---|---:|" + "---:|" * 4]
    for name, label in rows.items():
        runs = res.get(name)
        if not runs:
            continue
        mode = "blank" if VARIANTS[name][1].get("modalities") == "rgb" else "thermal"
        cells = [_pct(runs, lambda r, m=mode: r["test"][m]["miou"])]
        cells += [_pct(runs, lambda r, m=mode, c=c: r["test"][m]["conditions"][c]) for c in CONDITIONS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", _budget(res, list(rows))])


def thermal_only_table(res: dict[str, list[dict]], rows: dict[str, str] = THERMAL_ONLY_ROWS) -> str:
    """Night scores of the modality-dropout runs: paired, RGB blanked (thermal only), thermal blanked (RGB only)."""
    modes = (("thermal", "paired"), ("thermal_only", "thermal only"), ("blank", "RGB only"))
    header = ["backend (trained with modality dropout)"]
    header += [f"night mIoU, {label}" for _, label in modes]
    header += [f"night {cls} IoU, {label}" for cls in NIGHT_CLASSES for _, label in modes]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, label in rows.items():
        runs = [r for r in res.get(name, []) if "thermal_only" in r["test"]]
        if not runs:
            continue
        cells = [_pct(runs, lambda r, m=m: r["test"][m]["conditions"]["night"]) for m, _ in modes]
        cells += [_pct(runs, lambda r, m=m, c=c: r["test"][m]["night_iou"][c]) for c in NIGHT_CLASSES for m, _ in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", _budget(res, list(rows))])


def _budget(res: dict[str, list[dict]], names: list[str]) -> str:
    runs = [r for n in names for r in res.get(n, [])]
    if not runs:
        return "No results yet."
    r0 = runs[0]
    dates = sorted({r["date"] for r in runs})
    walls = [r["train_wall_s"] / 60 for r in runs]
    threads = "/".join(sorted({str(r.get("threads", 1)) for r in runs}))  # files without the key: 1 thread
    return (
        f"Each run: {r0['steps']} steps of batch {r0['batch']} from random init on {r0['train_scenes']} synthetic "
        f"scenes rendered at {r0['camera_size'][1]}x{r0['camera_size'][0]} and fitted to the model's "
        f"{r0['input_size'][1]}x{r0['input_size'][0]}; tested through the Segmenter on {r0['test_scenes']} held-out "
        f"scenes at {r0['camera_size'][1]}x{r0['camera_size'][0]} (a quarter per condition). Median "
        f"(range, seeds) in percent; training {np.median(walls):.1f} min per run on {threads} CPU thread(s); "
        f"{dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "") + "."
    )


# --------------------------------------------------------------------------- the demo checkpoint's card


def demo_card(checkpoint: Path, run_dir: Path | None, test_count: int = 128) -> dict:
    """Evaluate a checkpoint on the held-out synthetic test split at camera size, with and without
    thermal and with RGB blanked (the node's thermal-only mode); with the training run's summary when
    ``run_dir`` is given. The document of ``models/demo/metrics.json``."""
    from ..data.datasets import build_dataset
    from ..evaluation.evaluator import evaluate
    from ..models.classes import load_dataset_info
    from ..pipeline.segmenter import Segmenter

    seg = Segmenter.from_checkpoint(checkpoint, device="cpu", warmup=False)
    test = build_dataset("synthetic", None, "test", load_dataset_info("synthetic"), count=test_count, seed=0)
    repo = DEMO_METRICS.parents[2]
    shown = Path(checkpoint).resolve()
    shown = shown.relative_to(repo) if shown.is_relative_to(repo) else Path(checkpoint)  # no machine's path
    doc: dict = {"checkpoint": str(shown), "date": datetime.date.today().isoformat()}
    if run_dir is not None:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        keys = ("steps", "total_steps", "wall_s", "step_time_s_median", "peak_rss_mb", "best_miou")
        doc["training"] = {k: summary.get(k) for k in keys}
    for mode, blank in (("thermal", {}), ("blank", {"blank_thermal": True}), ("thermal_only", {"blank_rgb": True})):
        report = evaluate(seg, test, progress=False, **blank)
        doc[f"test_{mode}"] = {
            **_scores(report),
            "camera_size": list(test.size),
            "scenes": len(test),
            "per_class_iou": {k: v["iou"] for k, v in report["per_class"].items()},
        }
    return doc


def demo_table(doc: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = [
        "| held-out synthetic test scenes at 640x480 | mIoU | "
        + " | ".join(CONDITIONS)
        + " | night person IoU | night car IoU |",
        "|---|---:|" + "---:|" * (len(CONDITIONS) + 2),
    ]
    modes = (
        ("thermal", "RGB-T"),
        ("blank", "thermal blanked (thermal 0, valid false)"),
        ("thermal_only", "RGB blanked (black: the node's thermal-only mode)"),
    )
    for mode, label in modes:
        if f"test_{mode}" not in doc:
            continue
        t = doc[f"test_{mode}"]
        cells = [pct(t["miou"])] + [pct(t["conditions"].get(c)) for c in CONDITIONS]
        cells += [pct(t["night_iou"][k]) for k in NIGHT_CLASSES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    t = doc["test_thermal"]
    return "\n".join(lines + ["", f"{t['scenes']} scenes, a quarter per condition; evaluated {doc['date']}."])


def table_blocks(results: Path = RESULTS, readme=None, demo: Path = DEMO_METRICS) -> list[tuple[str, str, str]]:
    """Each learning table as ``(begin, end, body)``; the demo table only where a file of ``readme`` (one file,
    several, or None for README.md and docs/*.md) holds its markers."""
    res = load_results(results)
    blocks = [
        (BACKENDS_BEGIN, END, backends_table(res)),
        (ABLATION_BEGIN, END, ablation_table(res)),
        (SEGRGBX_ABLATION_BEGIN, END, ablation_table(res, SEGRGBX_ABLATION_ROWS, "SegRGB-X")),
        (THERMAL_ONLY_BEGIN, END, thermal_only_table(res)),
    ]
    if holder(readme, DEMO_BEGIN):
        blocks.append((DEMO_BEGIN, END, demo_table(json.loads(Path(demo).read_text()))))
    from . import loss_sweep  # it builds on this module's runs

    if holder(readme, loss_sweep.SWEEP_BEGIN):
        blocks.append(
            (loss_sweep.SWEEP_BEGIN, END, loss_sweep.sweep_table(loss_sweep.load_sweep(results / "loss_sweep")))
        )
    return blocks


def update_readme(readme=None, results: Path = RESULTS, check: bool = False, demo: Path = DEMO_METRICS) -> bool:
    """Write the tables between their markers, each in the file that holds it (``readme``: one file, several,
    or None for README.md and docs/*.md); with ``check`` only compare. True when up to date."""
    return update_blocks(readme, table_blocks(results, readme, demo), check)
