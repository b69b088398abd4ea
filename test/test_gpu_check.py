"""scripts/gpu_check.sh: its dry run end to end (``--device cpu``, as CI runs it) and its failure handling.

The dry run runs every step of the GPU check with the micro configs (see rgbt_seg_ros/bench/gpu_check.py);
here it takes about a minute. The JSON figures are checked for being there and plausible, not for speed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rgbt_seg_ros.bench import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
CONFIGS = ["sartm_micro", "cpal_micro", "fusionsam_micro"]


def _env() -> dict:
    return dict(os.environ, PYTHON=sys.executable)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    no_wheels = out / "no_wheels"  # everything is installed here: the install step must not need any
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--out", str(out), "--wheels", str(no_wheels)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out, proc


def load(out: Path, name: str) -> dict:
    path = out / name
    assert path.is_file(), f"{name} is missing"
    return json.loads(path.read_text())


def test_dry_run_passes_and_writes_every_file(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = load(out, "summary.json")
    assert summary["ok"] is True and summary["failed"] == [], summary["failed"]
    assert [s["name"] for s in summary["steps"]] == [s.name for s in gpu_check.plan("cpu", out)]
    assert all(s["status"] == "ok" for s in summary["steps"])
    files = ["env.json", "install.json", "pytest_cuda.json", "pytest_cuda.xml", "pipeline.json"]
    files += [f"{kind}_{c}.json" for kind in ("model", "train", "segmenter") for c in CONFIGS]
    for name in files:
        assert (out / name).is_file(), name
    # (f): where the JSON files are, and the table
    assert f"JSON files: {out}/" in proc.stdout
    assert "step" in proc.stdout and "status" in proc.stdout and "model_sartm_micro" in proc.stdout
    # (b): everything is installed in this venv: a no-op check, no pip run
    install = load(out, "install.json")
    assert install["status"] == "ok" and install["installed"] == [] and install["commands"] == []
    env = load(out, "env.json")
    assert env["torch"] and env["device"] == "cpu"


def test_dry_run_figures_make_sense(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    tests = load(out, "pytest_cuda.json")
    assert tests["tests"] >= 5 and tests["skipped"] == tests["tests"]  # no GPU here
    assert {c["message"] for c in tests["cases"]} == {"no CUDA device"}
    for c in CONFIGS:
        m = load(out, f"model_{c}.json")
        assert m["forward_ms_median"] > 0 and m["gflop_per_pair"] > 0 and m["matmul_gflops"] > 0
        assert m["input_size"] == [96, 128] and m["device"] == "cpu"
        t = load(out, f"train_{c}.json")
        assert t["batch"] == 8 and t["steps"] == 2 and t["step_ms_median"] > 0
        assert t["memory"]["kind"] == "rss" and t["peak_memory_mb"] > 0 and t["memory_growth_mb"] >= 0
        assert t["losses_finite"] and len(t["losses"]) == 3 and t["params_trainable"] > 0
        s = load(out, f"segmenter_{c}.json")
        assert s["complete"] and [v["name"] for v in s["variants"]] == ["fp32", "bf16", "fp16", "fp32+compile"]
        for v in s["variants"]:
            assert "error" not in v, v
            assert v["model_ms_median"] > 0 and v["confidence_finite"] and v["setup_s"] > 0
            assert v["labels_agreement_vs_fp32"] >= (0.99 if v["precision"] == "fp32" else 0.8)
        assert s["variants"][0]["labels_agreement_vs_fp32"] == 1.0
        assert s["variants"][-1]["compile"] == "default" and s["compile_backend"] == "eager"
    p = load(out, "pipeline.json")
    assert [s["camera_size"] for s in p["sizes"]] == [[480, 640], [720, 1280]]
    for size in p["sizes"]:
        assert size["stages_ms"]["model"]["median"] > 0 and size["total_ms_median"] > 0


def test_cuda_without_a_gpu_stops_at_the_check(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda would run the whole GPU check")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "torch.cuda.is_available() is False" in proc.stderr
    assert load(tmp_path, "env.json")["cuda_available"] is False
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [(["--device", "tpu"], "--device must be cuda or cpu"), (["--budget-s", "soon"], "--budget-s must be a number"),
     (["--frobnicate"], "unknown argument"), (["--out"], "--out needs a value")],
)  # fmt: skip
def test_bad_arguments_are_refused(args, message):
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failed_and_a_timed_out_step_are_recorded_and_the_next_steps_run(tmp_path, monkeypatch):
    pid_file = tmp_path / "hang.pid"
    steps = [
        gpu_check.Step(
            "fails", "model", _py("import sys; print('boom'); sys.exit(3)"), "fails", tmp_path / "f.json", 1
        ),
        gpu_check.Step(
            "hangs",
            "model",
            _py(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"),
            "hangs",
            tmp_path / "h.json",
            1,
        ),
        # the steps after the hang keep generous nominal times (a Python start on a busy machine takes seconds),
        # so the hang's timeout (what is left minus those) ends well before them
        gpu_check.Step("silent", "model", _py("pass"), "silent", tmp_path / "s.json", 5),
        gpu_check.Step(
            "writes",
            "model",
            _py(f"open({str(tmp_path / 'w.json')!r}, 'w').write('{{}}')"),
            "w",
            tmp_path / "w.json",
            10,
        ),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda device, out, repo=None: steps)
    monkeypatch.setitem(gpu_check.PROFILES["cpu"], "jobs", 1)
    monkeypatch.setattr(gpu_check, "RESERVE_S", 0.0)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0.5)
    assert gpu_check.run("cpu", tmp_path, budget_s=24.0) == 1
    summary = load(tmp_path, "summary.json")
    status = {s["name"]: s for s in summary["steps"]}
    assert [s["status"] for s in summary["steps"]] == ["failed", "timeout", "failed", "ok"]
    assert "exit code 3" in status["fails"]["error"] and "boom" in status["fails"]["error"]
    assert "timed out" in status["hangs"]["error"] and status["hangs"]["seconds"] < 24
    assert "was not written" in status["silent"]["error"]
    assert summary["failed"] == ["fails", "hangs", "silent"] and summary["ok"] is False
    with pytest.raises(ProcessLookupError):  # the timed-out step's process was killed
        os.kill(int(pid_file.read_text()), 0)


def test_a_step_without_budget_left_is_skipped(tmp_path):
    step = gpu_check.Step("late", "model", _py("pass"), "late", tmp_path / "l.json", 1)
    (rec,) = gpu_check.run_steps([step], budget_s=1.0, out=tmp_path)
    assert rec["status"] == "skipped" and "budget exhausted" in rec["error"]


def test_plan_runs_the_package_commands_for_both_devices(tmp_path):
    for device, size in (("cuda", ["480", "640"]), ("cpu", ["96", "128"])):
        steps = gpu_check.plan(device, tmp_path)
        kinds = [s.kind for s in steps]
        assert kinds == ["pytest"] + ["model"] * 3 + ["pipeline"] + ["train"] * 3 + ["segmenter"] * 3
        model = steps[1].argv
        assert model[1:6] == ["-m", "rgbt_seg_ros.cli", "bench", "model", "--config"]
        assert model[model.index("--size") + 1 : model.index("--size") + 3] == size
        assert steps[0].argv[-1] == "test/test_cuda.py" and "cuda" in steps[0].argv
        train = steps[5].argv
        assert train[3:5] == ["bench", "train"] and train[train.index("--batch") + 1] == "8"
        pipe = steps[4].argv
        assert pipe[pipe.index("--sizes") + 1 : pipe.index("--sizes") + 3] == ["480x640", "720x1280"]
    for step in gpu_check.plan("cuda", tmp_path)[1:]:
        config = step.argv[step.argv.index("--config") + 1]
        assert config.startswith("models/") and config.endswith("_tiny.yaml")


def test_a_step_that_ignores_sigint_is_recognised_so_it_gets_sigterm_at_once(tmp_path):
    # started from a background job of a non-interactive shell (`cmd &`, nohup) a step inherits SIGINT ignored;
    # before, the kill waited 15 s for it, and the timed-out step's test above failed in such a run
    def child(name: str, disposition: str) -> tuple[subprocess.Popen, Path]:
        ready = tmp_path / name
        code = (
            "import signal, time\n"
            f"signal.signal(signal.SIGINT, {disposition})\n"
            f"open({str(ready)!r}, 'w').write('x')\n"
            "time.sleep(60)\n"
        )
        return subprocess.Popen([sys.executable, "-c", code], start_new_session=True), ready

    ignoring, ready_i = child("ignoring", "signal.SIG_IGN")
    plain, ready_p = child("plain", "signal.default_int_handler")
    try:
        deadline = time.monotonic() + 60
        while not (ready_i.exists() and ready_p.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready_i.exists() and ready_p.exists(), "the children never started"
        assert gpu_check._ignores_sigint(ignoring.pid) and not gpu_check._ignores_sigint(plain.pid)
        gpu_check._kill_group(ignoring)
        assert ignoring.returncode == -signal.SIGTERM
    finally:
        for p in (ignoring, plain):
            if p.poll() is None:
                p.kill()
                p.wait()
