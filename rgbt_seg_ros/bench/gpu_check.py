"""The driver of ``scripts/gpu_check.sh``: every GPU figure of the project in one budgeted run (docs/gpu_check.md).

Three subcommands, which the shell script runs in this order (all write under ``--out``)::

    python -m rgbt_seg_ros.bench.gpu_check check   --device cuda --out OUT     # (a) python, torch, CUDA -> env.json
    python -m rgbt_seg_ros.bench.gpu_check install --wheels DIR --out OUT      # (b) missing packages -> install.json
    python -m rgbt_seg_ros.bench.gpu_check run     --device cuda --out OUT --budget-s 480   # (c)-(f) -> summary.json

``run`` starts each measurement as its own process, with the package's own commands (``rgbt-seg
bench model|pipeline|train``, ``python -m rgbt_seg_ros.bench.segmenter_benchmark``, ``pytest -m cuda``),
each writing JSON under OUT, each under a timeout taken from the budget: a step may use what is
left of the budget minus the nominal time of the steps after it. A step that fails or times out
(its process group is killed) is recorded in ``OUT/summary.json`` with the end of its log, and
the next step runs; the exit code is 1 when any step (or the install) failed. The cheap,
important steps come first and the compilations last.

``--device cpu`` is the dry run (CI, test/test_gpu_check.py): the micro configs and one or two
repetitions, but the same steps, commands and files. The other differences, all in ``PROFILES``
(copied into ``summary.json``): ``torch.compile`` uses the ``eager`` backend (dynamo traces the
model, as on CUDA, but inductor's C++ code generation takes about two minutes per micro model on a
2-core machine); two steps run at a time with one torch thread each (on CUDA one at a time, so
that timings do not share the machine); and the CUDA tests are all skipped ("no CUDA device").

This module imports nothing outside the standard library at the top, so ``check`` and
``install`` run before the dependencies are there. The shell script puts the checkout first on
``PYTHONPATH``: the code measured is the checkout's, whatever version of the package is installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: What differs between the GPU run and the CPU dry run; everything else is the same.
PROFILES: dict[str, dict] = {
    "cuda": {
        "configs": ["models/sartm_tiny.yaml", "models/cpal_tiny.yaml", "models/fusionsam_tiny.yaml"],
        "model_size": [480, 640],
        "model_repeats": 20,
        "pipeline_config": "models/sartm_tiny.yaml",
        "pipeline_sizes": ["480x640", "720x1280"],
        "pipeline_repeats": 20,
        "pipeline_warmup": 3,
        "train_batch": 8,
        "train_steps": 5,
        "train_warmup": 2,
        "segmenter_variants": ["fp32", "bf16", "fp16", "fp32+compile"],
        "segmenter_repeats": 20,
        "segmenter_warmup": 3,
        "compile_backend": "inductor",
        "jobs": 1,  # one step at a time: the timings must not share the machine
    },
    "cpu": {
        "configs": ["models/sartm_micro.yaml", "models/cpal_micro.yaml", "models/fusionsam_micro.yaml"],
        "model_size": [96, 128],
        "model_repeats": 2,
        "pipeline_config": "models/sartm_micro.yaml",
        "pipeline_sizes": ["480x640", "720x1280"],
        "pipeline_repeats": 2,
        "pipeline_warmup": 1,
        "train_batch": 8,
        "train_steps": 2,
        "train_warmup": 1,
        "segmenter_variants": ["fp32", "bf16", "fp16", "fp32+compile"],
        "segmenter_repeats": 2,
        "segmenter_warmup": 1,
        "compile_backend": "eager",
        "jobs": 2,  # two steps at a time, one torch thread each: the dry run is about commands, not timings
        "env": {"OMP_NUM_THREADS": "1"},
    },
}
#: Nominal seconds of each kind of step on the GPU machine: the time kept in reserve for later steps.
# Guesses (no GPU was available when this was written): summary.json's "seconds" of a first run are the real ones.
NOMINAL_S = {"pytest": 100.0, "model": 20.0, "pipeline": 35.0, "train": 25.0, "segmenter": 75.0}
RESERVE_S = 3.0  # kept back for writing the summary
MIN_STEP_S = 5.0  # a step is skipped when less than this is left
TORCH_FAMILY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def config_name(config: str) -> str:
    return Path(config).stem


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- (a) check


def check(device: str, out: Path) -> int:
    """Python and torch importable, CUDA usable for ``--device cuda``; writes ``env.json``."""
    env = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "checked": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "checkout": _git_describe(),
    }
    try:
        import torch
    except Exception as exc:  # any import failure: report it, nothing else can run
        env["error"] = f"torch is not importable: {type(exc).__name__}: {exc}"
        write_json(out / "env.json", env)
        print(f"gpu_check: {env['error']} (python: {sys.executable}; set PYTHON=...)", file=sys.stderr)
        return 3
    env.update(
        {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(),
            "torch_threads": torch.get_num_threads(),
        }
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["gpu0"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
            "bf16_supported": bool(torch.cuda.is_bf16_supported()),
        }
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    write_json(out / "env.json", env)
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: --device cuda, but torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}; python {sys.executable}). Use --device cpu for the dry run.",
            file=sys.stderr,
        )
        return 3
    gpu = env.get("gpu0", {}).get("name", "no GPU")
    print(f"gpu_check: python {env['python']}, torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}")
    return 0


def _git_describe() -> str | None:
    if not (REPO / ".git").exists() or not shutil.which("git"):
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


# --------------------------------------------------------------------------- (b) install


def _requirement_cls():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def runtime_requirements(repo: Path) -> list[str]:
    """requirements.txt's lines and pytest (the CUDA tests run here)."""
    reqs = []
    for line in (repo / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            reqs.append(line)
    return reqs + ["pytest>=8"]


def installed_version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def missing_requirements(repo: Path) -> tuple[list[str], bool, bool]:
    """(requirements not installed or not satisfied, sam2 missing, rgbt_seg_ros missing)."""
    Requirement = _requirement_cls()
    missing = []
    for text in runtime_requirements(repo):
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = installed_version(req.name)
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            missing.append(text)
    return missing, installed_version("sam2") is None, installed_version("rgbt_seg_ros") is None


def torch_pins() -> list[str]:
    """``name==version`` of the installed torch and its CUDA libraries: pip must not touch them."""
    import importlib.metadata as md

    pins = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and TORCH_FAMILY.match(canonical(name)):
            pins[canonical(name)] = dist.version
    return [f"{n}=={v}" for n, v in sorted(pins.items())]


def install(wheels: Path, out: Path, repo: Path) -> int:
    """(b): install from ``wheels`` only what is missing, never touching torch; writes ``install.json``."""
    t0 = time.monotonic()
    record: dict = {"wheels": str(wheels), "commands": []}
    missing, sam2_missing, package_missing = missing_requirements(repo)
    record.update(
        {
            "missing_before": missing
            + (["sam2==1.1.0"] if sam2_missing else [])
            + (["rgbt_seg_ros"] if package_missing else []),
            "torch_before": installed_version("torch"),
        }
    )
    if not record["missing_before"]:
        record.update({"status": "ok", "installed": [], "seconds": time.monotonic() - t0})
        write_json(out / "install.json", record)
        print(f"gpu_check: all {len(runtime_requirements(repo)) + 2} requirements are installed; nothing to install")
        return 0
    print(f"gpu_check: installing from {wheels}: {' '.join(record['missing_before'])}")
    if record["torch_before"] is None:
        return _install_failed(record, out, t0, "torch is not installed: install the machine's own torch build first")
    if not wheels.is_dir():
        return _install_failed(record, out, t0, f"wheel folder {wheels} does not exist: make gpu-wheels, then copy it")
    pins = out / "install_constraints.txt"
    pins.write_text("\n".join(torch_pins()) + "\n")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-index",
        "--find-links",
        str(wheels),
    ]
    commands = []
    if missing:
        commands.append(pip + ["-c", str(pins)] + missing)
    if sam2_missing:
        commands.append(pip + ["--no-deps", "sam2==1.1.0"])  # as the Makefile: its torchvision is not needed
    if package_missing:
        commands.append(pip + ["--no-deps", "rgbt_seg_ros"])
    log = out / "logs" / "install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        for cmd in commands:
            record["commands"].append(shlex.join(cmd))
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                return _install_failed(record, out, t0, f"pip exited {proc.returncode}: {_tail(log)}")
    record["torch_after"] = installed_version("torch")
    if record["torch_after"] != record["torch_before"]:
        return _install_failed(
            record, out, t0, f"torch changed from {record['torch_before']} to {record['torch_after']}"
        )
    still, sam2_still, package_still = missing_requirements(repo)
    if still or sam2_still or package_still:
        return _install_failed(record, out, t0, f"still missing after the install: {still}")
    record.update({"status": "ok", "installed": record["missing_before"], "seconds": time.monotonic() - t0})
    write_json(out / "install.json", record)
    print(f"gpu_check: installed {len(record['installed'])} requirement(s) in {record['seconds']:.0f} s")
    return 0


def _install_failed(record: dict, out: Path, t0: float, error: str) -> int:
    record.update({"status": "failed", "error": error, "seconds": time.monotonic() - t0})
    write_json(out / "install.json", record)
    print(f"gpu_check: install failed: {error}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- (c) the steps


@dataclass
class Step:
    name: str
    kind: str  # pytest | model | pipeline | train | segmenter
    argv: list[str]
    display: str  # the command as a person would type it
    json: Path | None
    nominal_s: float


def plan(device: str, out: Path, repo: Path = REPO, python: str = sys.executable) -> list[Step]:
    """The steps of one run, in order (see module docstring)."""
    prof = PROFILES[device]
    cli = [python, "-m", "rgbt_seg_ros.cli"]
    steps: list[Step] = []

    def add(name: str, kind: str, args: list[str], json_file: str | None, via: list[str] | None, shown: str):
        argv = (via if via is not None else cli) + args
        steps.append(
            Step(
                name, kind, argv, f"{shown} {shlex.join(args)}", out / json_file if json_file else None, NOMINAL_S[kind]
            )
        )

    tests = cuda_test_files(repo)
    add(
        "pytest_cuda",
        "pytest",
        ["-m", "cuda", "-p", "no:cacheprovider", "-q", "--junitxml", str(out / "pytest_cuda.xml"), *tests],
        None,
        [python, "-m", "pytest"],
        "pytest",
    )
    h, w = prof["model_size"]
    for cfg in prof["configs"]:
        add(
            f"model_{config_name(cfg)}",
            "model",
            ["bench", "model", "--config", cfg, "--size", str(h), str(w), "--device", device,
             "--repeats", str(prof["model_repeats"]), "--json", str(out / f"model_{config_name(cfg)}.json")],
            f"model_{config_name(cfg)}.json",
            None,
            "rgbt-seg",
        )  # fmt: skip
    add(
        "pipeline",
        "pipeline",
        ["bench", "pipeline", "--config", prof["pipeline_config"], "--device", device,
         "--sizes", *prof["pipeline_sizes"], "--repeats", str(prof["pipeline_repeats"]),
         "--warmup", str(prof["pipeline_warmup"]), "--json", str(out / "pipeline.json")],
        "pipeline.json",
        None,
        "rgbt-seg",
    )  # fmt: skip
    for cfg in prof["configs"]:
        add(
            f"train_{config_name(cfg)}",
            "train",
            ["bench", "train", "--config", cfg, "--batch", str(prof["train_batch"]), "--device", device,
             "--steps", str(prof["train_steps"]), "--warmup", str(prof["train_warmup"]),
             "--json", str(out / f"train_{config_name(cfg)}.json")],
            f"train_{config_name(cfg)}.json",
            None,
            "rgbt-seg",
        )  # fmt: skip
    for cfg in prof["configs"]:
        add(
            f"segmenter_{config_name(cfg)}",
            "segmenter",
            ["--config", cfg, "--device", device, "--variants", *prof["segmenter_variants"],
             "--repeats", str(prof["segmenter_repeats"]), "--warmup", str(prof["segmenter_warmup"]),
             "--compile-backend", prof["compile_backend"],
             "--json", str(out / f"segmenter_{config_name(cfg)}.json")],
            f"segmenter_{config_name(cfg)}.json",
            [python, "-m", "rgbt_seg_ros.bench.segmenter_benchmark"],
            "python -m rgbt_seg_ros.bench.segmenter_benchmark",
        )  # fmt: skip
    return steps


def cuda_test_files(repo: Path) -> list[str]:
    """Test files with a ``cuda`` mark (only those are collected: the others need ROS and more)."""
    files = [
        str(p.relative_to(repo))
        for p in sorted((repo / "test").glob("test_*.py"))
        if re.search(r"mark\.cuda\b", p.read_text(errors="replace"))
    ]
    return files or ["test/test_cuda.py"]


def child_env(repo: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _tail(path: Path, lines: int = 15, chars: int = 2000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def _ignores_sigint(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGINT (Linux: its SigIgn mask). A step started from a background job
    of a non-interactive shell (``cmd &``, nohup, some CI runners) inherits SIGINT ignored."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's whole process group (compile workers too).

    SIGINT first: pytest then stops and still writes its junit XML and Python benchmarks stop with
    what they wrote; then SIGTERM and SIGKILL, each after a wait. A step that ignores SIGINT gets SIGTERM
    at once (waiting for a signal it ignores only spent the budget of the steps after it).
    """
    ladder = ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10))
    if _ignores_sigint(proc.pid):
        ladder = ladder[1:]
    for sig, wait in ladder:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class RunningStep:
    """One step's process, started in its own process group with its log; ``finish`` makes its record."""

    def __init__(self, step: Step, timeout_s: float, out: Path, repo: Path, env: dict) -> None:
        self.step, self.timeout_s, self.out = step, timeout_s, out
        self.log = out / "logs" / f"{step.name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # a stale file from an earlier run must not pass for this one's
        stale = [step.json] if step.json is not None else [out / "pytest_cuda.xml", out / "pytest_cuda.json"]
        for path in stale:
            path.unlink(missing_ok=True)
        self.timed_out = False
        self.t0 = time.monotonic()
        with open(self.log, "w") as f:
            f.write(f"$ {step.display}\n")
            f.flush()
            self.proc = subprocess.Popen(
                step.argv, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    def poll(self) -> bool:
        """True once the process has ended or has been killed at its timeout."""
        if self.proc.poll() is not None:
            return True
        if time.monotonic() - self.t0 > self.timeout_s:
            _kill_group(self.proc)
            self.timed_out = True
            return True
        return False

    def finish(self) -> dict:
        step, out, log = self.step, self.out, self.log
        rc = None if self.timed_out else self.proc.returncode
        status = "timeout" if self.timed_out else ("ok" if rc == 0 else "failed")
        rec = {
            "name": step.name,
            "kind": step.kind,
            "command": step.display,
            "json": str(step.json) if step.json else None,
            "log": str(log),
            "timeout_s": round(self.timeout_s, 1),
            "seconds": round(time.monotonic() - self.t0, 2),
            "rc": rc,
        }
        if step.kind == "pytest":
            summary = pytest_summary(out / "pytest_cuda.xml")
            write_json(out / "pytest_cuda.json", summary)
            rec["json"] = str(out / "pytest_cuda.json")
            if status == "ok" and summary.get("tests", 0) == 0:
                status = "failed"
                rec["error"] = "no CUDA test was collected"
        data = read_json(step.json) if step.json else None
        if status == "ok" and step.json is not None and data is None:
            status = "failed"
            rec["error"] = f"exit 0 but {step.json.name} was not written"
        if status == "timeout":
            rec["error"] = f"timed out after {self.timeout_s:.0f} s (process group killed); log: {_tail(log, 8)}"
            if data is not None:
                rec["error"] += f" ({step.json.name} holds what finished before)"
        elif status == "failed" and "error" not in rec:
            rec["error"] = f"exit code {rc}: {_tail(log)}"
        rec["status"] = status
        rec["figure"] = figure(step.kind, data if step.kind != "pytest" else read_json(out / "pytest_cuda.json"))
        return rec


def run_step(step: Step, timeout_s: float, out: Path, repo: Path = REPO, env: dict | None = None) -> dict:
    """Run one step in its own process group under ``timeout_s``; returns its record."""
    running = RunningStep(step, timeout_s, out, repo, env or child_env(repo))
    while not running.poll():
        time.sleep(0.1)
    return running.finish()


def pytest_summary(xml_path: Path) -> dict:
    """Counts and test cases of a junit XML file (pytest --junitxml)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"tests": 0, "error": f"no junit XML: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    cases = []
    for case in root.iter("testcase"):
        if not case.get("name"):
            continue  # an interrupted run (timeout) can leave an empty entry
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, message = tag, (el.get("message") or "")[:500]
                break
        cases.append(
            {
                "name": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": float(case.get("time", 0) or 0),
                "message": message,
            }
        )
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = sum(float(s.get("time", 0) or 0) for s in suites)
    return {**counts, "cases": cases}


def figure(kind: str, data: dict | None) -> str:
    """The step's headline numbers, for the table."""
    if not data:
        return ""
    try:
        if kind == "pytest":
            skipped = {c["message"] for c in data.get("cases", []) if c["outcome"] == "skipped"}
            why = f" ({'; '.join(sorted(m for m in skipped if m))})" if skipped else ""
            return (
                f"{data['passed']} passed, {data['failures'] + data['errors']} failed, {data['skipped']} skipped{why}"
            )
        if kind == "model":
            return (
                f"forward {data['forward_ms_median']:.1f} ms, {data['gflop_per_pair']:.1f} GFLOP, "
                f"{data['achieved_gflops']:.0f} GFLOP/s = {data['ratio_to_matmul']:.2f} of matmul"
            )
        if kind == "pipeline":
            parts = []
            for s in data["sizes"]:
                h, w = s["camera_size"]
                parts.append(
                    f"{w}x{h}: model {s['stages_ms']['model']['median']:.1f} ms + overhead "
                    f"{s['overhead_ms_median']:.1f} ms"
                )
            return "; ".join(parts)
        if kind == "train":
            return (
                f"step {data['step_ms_median']:.0f} ms (batch {data['batch']}), peak {data['peak_memory_mb']:.0f} MB "
                f"({data['memory']['kind']}), growth {data['memory_growth_mb']:+.0f} MB"
            )
        if kind == "segmenter":
            parts = []
            for v in data["variants"]:
                if "error" in v:
                    parts.append(f"{v['name']} failed")
                else:
                    extra = f", setup {v['setup_s']:.0f} s" if v["compile"] != "none" else ""
                    parts.append(f"{v['name']} {v['model_ms_median']:.1f} ms ({v['speedup_vs_fp32']:.2f}x{extra})")
            return ", ".join(parts) + ("" if data.get("complete") else " [incomplete]")
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return f"(unreadable JSON: {type(exc).__name__}: {exc})"
    return ""


def run_steps(
    steps: list[Step],
    budget_s: float,
    out: Path,
    on_record=None,
    repo: Path = REPO,
    jobs: int = 1,
    env: dict | None = None,
) -> list[dict]:
    """Run the steps in order, ``jobs`` at a time, within ``budget_s`` (see module docstring).

    A step's timeout, fixed when it starts: what is left of the budget minus the nominal time of the
    steps after it (per job), but at least its own nominal time and at most what is left.
    """
    t0 = time.monotonic()
    env = env or child_env(repo)
    records: dict[int, dict] = {}
    running: dict[int, RunningStep] = {}

    def done(i: int, rec: dict) -> None:
        records[i] = rec
        print(f"gpu_check:   {steps[i].name} -> {rec['status']} in {rec['seconds']:.1f} s {rec['figure']}", flush=True)
        if on_record is not None:
            on_record([records[k] for k in sorted(records)])

    pending = list(range(len(steps)))
    while pending or running:
        while pending and len(running) < max(1, jobs):
            i = pending.pop(0)
            step = steps[i]
            remaining = budget_s - (time.monotonic() - t0) - RESERVE_S
            later = sum(s.nominal_s for s in steps[i + 1 :]) / max(1, jobs)
            timeout = min(remaining, max(step.nominal_s, remaining - later))
            if timeout < MIN_STEP_S:
                done(
                    i,
                    {
                        "name": step.name,
                        "kind": step.kind,
                        "command": step.display,
                        "json": str(step.json) if step.json else None,
                        "status": "skipped",
                        "seconds": 0.0,
                        "error": f"budget exhausted ({budget_s:.0f} s): {max(0.0, remaining):.0f} s left",
                        "figure": "",
                    },
                )
                continue
            print(
                f"gpu_check: [{i + 1}/{len(steps)}] {step.name} (timeout {timeout:.0f} s): {step.display}", flush=True
            )
            running[i] = RunningStep(step, timeout, out, repo, env)
        for i in [k for k, r in running.items() if r.poll()]:
            done(i, running.pop(i).finish())
        if running:
            time.sleep(0.1)
    return [records[k] for k in sorted(records)]


def table(records: list[dict], install: dict | None) -> str:
    rows = [("step", "status", "s", "figures")]
    if install is not None:
        n = len(install.get("installed") or [])
        rows.append(("install", install.get("status", "?"), f"{install.get('seconds', 0):.0f}", f"{n} installed"))
    for r in records:
        rows.append((r["name"], r["status"], f"{r.get('seconds', 0):.0f}", r.get("figure") or r.get("error", "")[:100]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    return "\n".join(lines)


def run(device: str, out: Path, budget_s: float, repo: Path = REPO) -> int:
    """(c)-(f): every step, ``summary.json``, the table; 1 when any step or the install failed."""
    started = time.monotonic()
    install = read_json(out / "install.json")
    steps = plan(device, out, repo)
    summary = {
        "device": device,
        "budget_s": budget_s,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "out": str(out),
        "profile": PROFILES[device],
        "env": read_json(out / "env.json"),
        "install": install,
        "packages": {
            n: installed_version(n)
            for n in ("torch", "numpy", "sam2", "peft", "transformers", "opencv-python-headless", "rgbt_seg_ros")
        },
        "code": f"{repo} (first on PYTHONPATH)",
        "steps": [],
    }

    def save(records: list[dict]) -> None:
        summary["steps"] = records
        summary["wall_s"] = round(time.monotonic() - started, 1)
        failed = [r["name"] for r in records if r["status"] != "ok"]
        if install is not None and install.get("status") != "ok":
            failed.insert(0, "install")
        summary["failed"] = failed
        summary["ok"] = not failed and len(records) == len(steps)
        write_json(out / "summary.json", summary)

    save([])
    env = child_env(repo)
    env.update(PROFILES[device].get("env", {}))
    records = run_steps(steps, budget_s, out, on_record=save, repo=repo, jobs=PROFILES[device]["jobs"], env=env)
    save(records)
    print()
    print(table(records, install))
    print()
    n_ok = sum(r["status"] == "ok" for r in records)
    print(
        f"gpu_check ({device}): {n_ok} of {len(records)} steps ok in {summary['wall_s']:.0f} s "
        f"(budget {budget_s:.0f} s). JSON files: {out}/ (summary.json, env.json, install.json, pytest_cuda.json, "
        "model_*.json, pipeline.json, train_*.json, segmenter_*.json); logs: " + str(out / "logs")
    )
    if summary["failed"]:
        print(f"gpu_check: FAILED: {', '.join(summary['failed'])} (see summary.json and the logs)", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rgbt_seg_ros.bench.gpu_check", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="(a) python, torch and CUDA; writes env.json")
    i = sub.add_parser("install", help="(b) install what is missing from the wheel folder; writes install.json")
    r = sub.add_parser("run", help="(c)-(f) the measurements; writes summary.json and one JSON per step")
    for q in (c, i, r):
        q.add_argument(
            "--out", type=Path, default=REPO / "gpu_check_out", help="output folder (default gpu_check_out/)"
        )
    for q in (c, r):
        q.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda, or cpu for the dry run")
    i.add_argument("--wheels", type=Path, default=REPO / "gpu_wheels", help="wheel folder (default gpu_wheels/)")
    for q in (i, r):
        q.add_argument("--repo", type=Path, default=REPO, help="the checkout (default: this module's)")
    r.add_argument("--budget-s", type=float, default=480.0, help="time for all steps, seconds (default 480)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.cmd == "check":
        return check(args.device, out)
    if args.cmd == "install":
        return install(args.wheels.resolve(), out, args.repo.resolve())
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    return run(args.device, out, args.budget_s, args.repo.resolve())


if __name__ == "__main__":
    sys.exit(main())
