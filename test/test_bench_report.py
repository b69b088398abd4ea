"""The benchmark table (README.md or a docs/ page) is generated from the committed result files, never typed by hand."""

import json

import pytest

from conftest import REPO
from rgbt_seg_ros.evaluation import reports as bench_report


def test_readme_table_is_what_the_committed_results_give():
    results = REPO / "docs" / "results" / "bench"
    assert bench_report.update_readme(bench_report.doc_files(REPO), results, check=True), (
        "the benchmark table differs from docs/results/bench: run `rgbt-seg bench table`"
    )
    runs = bench_report.load_runs(results)
    for row in bench_report.ROWS:  # every row of the table rests on at least 3 runs
        assert len(runs.get(row.name, [])) >= 3, row.name


def test_spread_gives_median_and_range_and_says_when_there_is_one_run():
    assert bench_report.spread([3.0, 1.0, 2.0], 1, " ms") == "2.0 ms (1.0-3.0, 3 runs)"
    assert bench_report.spread([4.25], 2) == "4.25 (1 run)"
    assert bench_report.spread([None]) == "n/a"


def test_update_writes_between_the_markers_only(tmp_path):
    results = tmp_path / "bench"
    results.mkdir()
    for k, fps in enumerate((80.0, 90.0, 85.0), start=1):
        sizes = [
            {"camera_size": list(hw), "sustained": {"fps": fps + i, "latency_ms": {"p95": 20.0}}}
            for i, hw in enumerate(((480, 640), (720, 1280)))
        ]
        run = {"model_stand_in_ms": 10, "sizes": sizes, "date": f"2026-12-0{k}"}
        (results / f"pipeline_standin10_run{k}.json").write_text(json.dumps(run))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{bench_report.BEGIN}\nold table\n{bench_report.END}\nafter\n")
    assert not bench_report.update_readme(readme, results, check=True)
    assert "old table" in readme.read_text()  # check mode writes nothing
    assert not bench_report.update_readme(readme, results)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "**85.0 fps (80.0-90.0, 3 runs)**" in text and "2026-12-01 to 2026-12-03" in text
    assert bench_report.update_readme(readme, results, check=True)


def test_pipeline_cell_shows_the_registration_health_estimate_only_where_every_run_has_it():
    def run(with_health: bool) -> dict:
        sizes = []
        for hw in ((480, 640), (720, 1280)):
            size = {
                "camera_size": list(hw),
                "overhead_ms_median": 3.0,
                "stages_ms": {"model": {"median": 40.0}},
                "sustained": {"fps": 20.0},
            }
            if with_health:
                size["registration_health"] = {
                    "estimate_ms": {"median": 6.0, "p95": 7.0, "n": 50},
                    "check_every": 10,
                    "amortised_ms_per_frame": 0.6,
                }
            sizes.append(size)
        return {"sizes": sizes}

    assert "registration-health" not in bench_report._pipeline([run(False), run(True)])
    cell = bench_report._pipeline([run(True), run(True)])
    assert "registration-health estimate at 640x480 6.0 ms (6.0-6.0, 2 runs)" in cell
    assert "once per 10 pairs" in cell and "0.60 ms (0.60-0.60, 2 runs) per frame amortised" in cell


def test_a_broken_result_file_is_named(tmp_path):
    (tmp_path / "memory_micro_run1.json").write_text("{not json")
    with pytest.raises(ValueError, match="memory_micro_run1.json is not valid JSON"):
        bench_report.table(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no file holds the table markers"):
        bench_report.update_readme(readme, tmp_path / "empty")


def test_write_each_writes_every_missing_result_at_once_and_skips_the_rest(tmp_path, capsys):
    from rgbt_seg_ros.evaluation.reports import write_each

    (tmp_path / "b_run1.json").write_text('{"old": true}')
    made = []

    def run(name, k):
        made.append((name, k))
        return {"name": name, "k": k}

    write_each(
        [("a", 1), ("b", 1)],
        lambda n, k: tmp_path / f"{n}_run{k}.json",
        run,
        lambda d, p: f"did {p.name}",
        progress=False,
    )
    assert made == [("a", 1)] and json.loads((tmp_path / "a_run1.json").read_text()) == {"name": "a", "k": 1}
    assert json.loads((tmp_path / "b_run1.json").read_text()) == {"old": True}
    assert "did a_run1.json" in capsys.readouterr().out and not list(tmp_path.glob("*.partial"))


def test_a_table_is_written_in_the_file_that_holds_its_markers_and_missing_markers_are_named(tmp_path):
    results = tmp_path / "bench"
    results.mkdir()
    sizes = [
        {"camera_size": list(hw), "sustained": {"fps": 80.0, "latency_ms": {"p95": 20.0}}}
        for hw in ((480, 640), (720, 1280))
    ]
    run = {"model_stand_in_ms": 10, "sizes": sizes, "date": "2026-12-01"}
    (results / "pipeline_standin10_run1.json").write_text(json.dumps(run))
    readme, page = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    readme.write_text("no table here\n")
    page.write_text(f"a\n{bench_report.BEGIN}\nold\n{bench_report.END}\nb\n")
    files = bench_report.doc_files(tmp_path)
    assert files == [readme, page]
    assert not bench_report.update_readme(files, results)
    assert readme.read_text() == "no table here\n" and "old" not in page.read_text()
    assert bench_report.update_readme(files, results, check=True)
    with pytest.raises(ValueError, match="no file holds the table markers"):
        bench_report.update_readme([readme], results, check=True)


def test_an_installed_package_looks_for_the_tables_in_the_current_directory(tmp_path, monkeypatch):
    # installed, the module's grandparent folder is site-packages' parent: no README.md there. Before, the
    # default file list was that folder's, and `rgbt-seg bench table` (scripts/measure_benchmarks.sh, run
    # from the repository with the installed command) said "no file holds the table markers".
    from rgbt_seg_ros.evaluation import reports

    monkeypatch.setattr(reports, "REPO_ROOT", tmp_path / "lib" / "python3")
    project = tmp_path / "project"
    (project / "docs").mkdir(parents=True)
    (project / "README.md").write_text("readme\n")
    (project / "docs" / "benchmarks.md").write_text("page\n")
    monkeypatch.chdir(project)
    root = project.resolve()
    assert [f.resolve() for f in reports.doc_files()] == [root / "README.md", root / "docs" / "benchmarks.md"]


def test_scale_table_gives_each_backends_cost_at_both_sizes():
    def run(gflop, ms):
        params = {"params_total": 36_047_768, "params_trainable": 5_402_959}
        return {"gflop_per_pair": gflop, "forward_ms_median": ms, "date": "2026-12-07", **params}

    runs = {
        "scale_sartm_480x640": [run(152.3, 1600.0), run(152.3, 1700.0), run(152.3, 1650.0)],
        "scale_sartm_768x1024": [run(434.7, 4950.0), run(434.7, 5000.0), run(434.7, 5100.0)],
        "scale_cpal_480x640": [run(100.0, 1000.0)],  # one size only: no row
    }
    lines = bench_report.scale_table(runs)
    rows = [line for line in lines if line.startswith("| SARTM")]
    assert rows == [
        "| SARTM | 36.05 M / 5.40 M | 152.3 | 434.7 | 2.85 | 1650 ms (1600-1700, 3 runs) | 5000 ms (4950-5100, 3 runs) "
        "| 3.03 |"
    ]
    assert not [line for line in lines if line.startswith("| CPAL")]
    assert bench_report.scale_table({}) == []


def test_committed_scale_results_cover_every_backend_at_both_sizes():
    runs = bench_report.load_runs(REPO / "docs" / "results" / "bench")
    names = {n for n in runs if n.startswith("scale_")}
    expected = {f"scale_{b}_{h}x{w}" for b in bench_report.SCALE_BACKENDS for h, w in bench_report.SCALE_SIZES}
    assert names == expected, sorted(expected - names)
    for name in names:
        sizes = {tuple(r["input_size"]) for r in runs[name]}
        assert sizes == {tuple(int(x) for x in name.rsplit("_", 1)[1].split("x"))}, name
