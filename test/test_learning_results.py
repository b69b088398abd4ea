"""The backend and ablation tables (README.md and docs/ pages) come from the committed result files, and those
files back the claims the docs make (every backend relies on thermal at night; at least 3 seeds per row)."""

import json

import numpy as np
import pytest

from conftest import REPO
from rgbt_seg_ros.evaluation.reports import doc_files
from rgbt_seg_ros.training import evidence

RESULTS = REPO / "docs" / "results" / "learning"


def test_readme_tables_are_what_the_committed_results_give():
    assert evidence.update_readme(doc_files(REPO), RESULTS, check=True), (
        "the learning tables in README.md / docs differ from docs/results/learning: run `rgbt-seg experiments table`"
    )


def test_every_row_rests_on_three_seeds_at_one_budget():
    res = evidence.load_results(RESULTS)
    rows = set(evidence.BACKEND_ROWS) | set(evidence.ABLATION_ROWS) | set(evidence.SEGRGBX_ABLATION_ROWS)
    rows |= set(evidence.THERMAL_ONLY_ROWS)
    budgets = set()
    for name in rows:
        runs = res.get(name, [])
        assert len({r["seed"] for r in runs}) >= 3, f"{name}: {len(runs)} seed(s)"
        budgets |= {(r["steps"], r["batch"], r["train_scenes"], tuple(r["input_size"]), r["test_scenes"]) for r in runs}
        assert all(r["camera_size"] == [480, 640] for r in runs), f"{name} was not tested at camera size"
    assert len(budgets) == 1, budgets


@pytest.mark.parametrize("backend", sorted(evidence.BACKEND_ROWS))
def test_each_backend_relies_on_thermal_at_night(backend):
    """Issue #17's acceptance: after 500 steps of batch 8 from the micro config, blanking thermal costs
    at least 3 points of night mIoU (median over the seeds), and night mIoU with thermal is at least 10."""
    runs = evidence.load_results(RESULTS)[backend]
    assert all(r["steps"] == 500 and r["batch"] == 8 for r in runs)
    night = np.median([r["test"]["thermal"]["conditions"]["night"] for r in runs])
    drop = np.median([evidence.night_drop(r) for r in runs])
    assert night >= 0.10 and drop >= 0.03, (backend, night, drop)


@pytest.mark.parametrize("variant", sorted(evidence.THERMAL_ONLY_ROWS))
def test_modality_dropout_models_keep_night_miou_when_rgb_dies(variant):
    """README's thermal-only claim: trained with modality dropout (p_rgb 0.2, p_thermal 0.2), every seed loses
    at most 1.5 points of night mIoU with RGB blanked (the node's thermal_only), and keeps more than with
    thermal blanked."""
    runs = evidence.load_results(RESULTS)[variant]
    for r in runs:
        assert r["overrides"] == {"transform": {"modality_dropout": {"p_rgb": 0.2, "p_thermal": 0.2}}}, variant
        paired, only = r["test"]["thermal"]["conditions"]["night"], r["test"]["thermal_only"]["conditions"]["night"]
        assert paired - only <= 0.015, (variant, r["seed"], paired, only)
        assert only > r["test"]["blank"]["conditions"]["night"], (variant, r["seed"])


def _doc(variant, seed, miou, night, night_blank):
    """A result file as written before the thermal_only test mode (the other tables read such files)."""
    scores = {"miou": miou, "conditions": {"day": miou, "night": night, "fog": miou, "glare": miou}}
    return {
        "variant": variant,
        "seed": seed,
        "steps": 10,
        "batch": 2,
        "train_scenes": 4,
        "input_size": [96, 128],
        "camera_size": [480, 640],
        "test_scenes": 8,
        "recipe": "recipe: SARTM paper (AdamW lr 0.001, wd 0.01, poly 0.9, OHEM cross-entropy)",
        "train_wall_s": 60.0,
        "date": "2026-12-02",
        "test": {
            "thermal": {**scores, "night_iou": {"person": 0.5, "car": 0.6}},
            "blank": {"miou": miou / 2, "conditions": {"night": night_blank}, "night_iou": {"person": 0.0, "car": 0.2}},
        },
    }


def test_tables_give_median_and_range_over_seeds_and_write_between_the_markers_only(tmp_path):
    results = tmp_path / "learning"
    results.mkdir()
    for seed, (m, n, nb) in enumerate([(0.40, 0.30, 0.10), (0.50, 0.20, 0.15), (0.45, 0.25, 0.05)]):
        (results / f"sartm_seed{seed}.json").write_text(json.dumps(_doc("sartm", seed, m, n, nb)))
    res = evidence.load_results(results)
    row = [line for line in evidence.backends_table(res).splitlines() if line.startswith("| SARTM")][0]
    assert "| 45.0 (40.0-50.0, 3 seeds) | 25.0 (20.0-30.0, 3 seeds) | 10.0 (5.0-15.0, 3 seeds) |" in row
    assert "| 20.0 (5.0-20.0, 3 seeds) |" in row  # night drop per seed (20, 5, 20), then the median
    assert "| 50.0 / 0.0 | 60.0 / 20.0 |" in row  # night person and car IoU, medians with / without thermal
    assert "| AdamW lr 0.001, wd 0.01, poly 0.9, OHEM cross-entropy |" in row
    readme = tmp_path / "README.md"
    readme.write_text(
        f"a\n{evidence.BACKENDS_BEGIN}\nold\n{evidence.END}\nb\n{evidence.ABLATION_BEGIN}\nold\n{evidence.END}\n"
        f"{evidence.SEGRGBX_ABLATION_BEGIN}\nold\n{evidence.END}\n{evidence.THERMAL_ONLY_BEGIN}\nold\n{evidence.END}\nc\n"
    )
    assert not evidence.update_readme(readme, results, check=True)
    assert "old" in readme.read_text()
    assert not evidence.update_readme(readme, results)
    text = readme.read_text()
    assert "old" not in text and text.startswith("a\n") and "\nb\n" in text and text.endswith("c\n")
    assert evidence.update_readme(readme, results, check=True)
    (results / "sartm_seed3.json").write_text("{broken")
    with pytest.raises(ValueError, match="sartm_seed3.json is not valid JSON"):
        evidence.load_results(results)


def test_thermal_only_table_gives_paired_thermal_only_and_rgb_only_night_scores(tmp_path):
    results = tmp_path / "learning"
    results.mkdir()
    name = "cpal_modality_dropout"
    for seed, (person, car) in enumerate([(0.30, 0.40), (0.10, 0.20), (0.20, 0.60)]):
        doc = _doc(name, seed, 0.5, 0.4, 0.1)
        doc["test"]["thermal_only"] = {
            "miou": 0.3,
            "conditions": {"night": 0.3 - 0.05 * seed},
            "night_iou": {"person": person, "car": car},
        }
        (results / f"{name}_seed{seed}.json").write_text(json.dumps(doc))
    (results / "sartm_modality_dropout_seed0.json").write_text(
        json.dumps(_doc("sartm_modality_dropout", 0, 0.5, 0.4, 0.1))
    )
    res = evidence.load_results(results)
    table = evidence.thermal_only_table(res)
    assert "| SARTM |" not in table  # a result file written before the thermal_only test mode loads, has no row
    row = [line for line in table.splitlines() if line.startswith("| CPAL")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # night mIoU paired, thermal only, RGB only
    assert cells[1:4] == ["40.0 (40.0-40.0, 3 seeds)", "25.0 (20.0-30.0, 3 seeds)", "10.0 (10.0-10.0, 3 seeds)"]
    assert cells[4:7] == ["50.0 (50.0-50.0, 3 seeds)", "20.0 (10.0-30.0, 3 seeds)", "0.0 (0.0-0.0, 3 seeds)"]
    assert cells[7:10] == ["60.0 (60.0-60.0, 3 seeds)", "40.0 (20.0-60.0, 3 seeds)", "20.0 (20.0-20.0, 3 seeds)"]
    header = table.splitlines()[0]
    assert "night person IoU, thermal only" in header and "night car IoU, RGB only" in header


def test_the_demo_card_names_its_checkpoint_inside_the_repository():
    card = json.loads(evidence.DEMO_METRICS.read_text())
    assert card["checkpoint"] == "models/demo"  # never a path of the machine that wrote it
    assert {"test_thermal", "test_blank", "test_thermal_only"} <= set(card)


# ---------------------------------------------------------------- the loss sweep (SARTM's loss presets)
def test_the_loss_sweep_has_every_arm_on_three_seeds_at_one_budget_per_config():
    """The micro config and the larger demo config each run the full grid; 3 seeds per arm, one budget per
    config."""
    from rgbt_seg_ros.training import loss_sweep

    sweep = loss_sweep.load_sweep(loss_sweep.RESULTS)
    missing = {c: sorted(set(loss_sweep.arms()) - set(by_arm)) for c, by_arm in sweep.items()}
    assert loss_sweep.full_grid(sweep) == ["sartm_demo", "sartm_micro"], missing
    for config, by_arm in sweep.items():
        budgets = set()
        for arm, runs in by_arm.items():
            assert len({r["seed"] for r in runs}) >= 3, f"{config} {arm}: {len(runs)} seed(s)"
            assert all(r["overrides"]["loss"] == loss_sweep.arms()[arm] for r in runs), (config, arm)
            budgets |= {(r["steps"], r["batch"], r["train_scenes"], tuple(r["input_size"])) for r in runs}
        assert len(budgets) == 1, (config, budgets)


def test_the_calibrated_preset_is_the_arm_the_sweep_supports():
    from rgbt_seg_ros.training import loss_sweep

    best = loss_sweep.best_arm(loss_sweep.load_sweep(loss_sweep.RESULTS))
    assert best is not None
    assert loss_sweep.preset_arm("calibrated") == best, (
        f"the sweep's best arm is {best}; losses.LOSS_PRESETS['calibrated'] trains as "
        f"{loss_sweep.preset_arm('calibrated')}"
    )


def test_sweep_arms_and_presets():
    from rgbt_seg_ros.training import loss_sweep

    table = loss_sweep.arms()
    assert len(table) == 1 + 2 * 4 * 2 - 1  # paper + w2 x w3 x warm-up, nothing to ramp at w2 = w3 = 0
    assert table["w2_10000_w3_100_warmup"] == {"weights": [1.0, 1.0, 10000.0, 100.0], "language_warmup": 0.2}
    assert loss_sweep.preset_arm("paper") == "paper"
    assert loss_sweep.preset_arm("authors_code") is None  # w2 = 1 is not an arm
