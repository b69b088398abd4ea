#!/usr/bin/env python3
"""``make gpu-wheels``: a folder of wheels that installs rgbt_seg_ros offline next to an existing torch.

For a machine with an NVIDIA GPU and PyTorch already installed but no network
(``scripts/gpu_check.sh --wheels DIR`` installs from it; docs/gpu_check.md). Written into ``--out``:

* ``sam2-1.1.0-py3-none-any.whl``: built here from PyPI's sdist with ``SAM2_BUILD_CUDA=0`` and
  ``--no-deps --no-build-isolation``, as the Makefile installs it (pure Python, no CUDA extension);
* ``rgbt_seg_ros-<version>-py3-none-any.whl``: this checkout (tracked and untracked, not ignored files),
  built in a temporary copy so that the checkout's ``build/`` is not touched;
* every dependency of ``requirements.txt`` (+ pytest, for the CUDA tests) and all of theirs, as
  binary wheels for CPython ``--pythons`` (default 3.10 3.11 3.12) on manylinux x86_64 (glibc 2.17
  to 2.28), downloaded with ``pip download --only-binary=:all: --python-version ... --platform ...``.
  Pure-Python wheels are stored once (pip skips a file that is already there). The few
  dependencies PyPI has only as sdists (antlr4-python3-runtime, iopath, ...) are built into
  pure-Python wheels first, here;
* ``MANIFEST.txt``: what is there, per Python version, with sizes, sha256 and how long it took.

**torch is not in it**, nor its CUDA libraries (nvidia-*, triton): the GPU machine has its own
build. So that pip's resolver does not fetch them, it resolves against a stub wheel
``torch-<pin>+stub`` (metadata only, no dependencies) that is removed afterwards; torch's own
pure-Python dependencies (sympy, networkx, jinja2, ...) are not fetched either, for the same reason.

Versions: the pins of ``constraints.txt`` where PyPI has a wheel of that version for the Python
version (e.g. numpy 2.4.6 has none for 3.10: pip then picks the newest that has one, and
MANIFEST.txt says so); the rest as pip's resolver chooses them for that Python version.
Needs pip >= 22.2 and the network access to PyPI that ``make`` uses; run with the project's venv
python (its torch and setuptools build sam2).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAM2_PIN = "sam2==1.1.0"
EXTRA_REQUIREMENTS = ["pytest"]  # the CUDA tests (pytest -m cuda) run on the GPU machine
# manylinux_2_N is matched exactly by pip: list every N from 2.17 (manylinux2014) to 2.28 (what torch
# >= 2.6's own wheels need, so any machine that runs a current torch wheel has that glibc). Older tags
# first: where a version has several builds, pip then takes the most widely usable one.
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 29)]
# pip's words for a requirement it found no usable file of (here: no wheel, with --only-binary)
MISSING_DIST = r"(?:No matching distribution found for|satisfies the requirement) ([A-Za-z0-9._-]+)(==([^\s;,()]+))?"
TORCH_FAMILY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
# Directories never copied into the package build (build outputs, venvs, other wheelhouses).
SKIP_DIRS = {".git", ".venv", ".venv-compat", "build", "install", "log", "gpu_wheels", "gpu_check_out", "__pycache__"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file: {canonical name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)$", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def read_requirement_names(path: Path) -> list[str]:
    """Requirement lines of requirements.txt (the whole specifier, comments dropped)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[: -len(".whl")].split("-")
    return canonical(parts[0]), parts[1]


def run(
    cmd: list[str], env: dict | None = None, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    shown = [a for a in cmd if not a.startswith("manylinux")]  # the 13 --platform values make it unreadable
    print("+", " ".join(shown).replace(" --platform", "").replace(sys.executable + " -m ", ""), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=cwd, text=True, capture_output=True)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"gpu_wheels: command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc


def make_stub_torch(folder: Path, version: str) -> str:
    """A metadata-only ``torch-<version>+stub`` wheel: satisfies torch>=X for the resolver, pulls nothing."""
    stub_version = f"{version}+stub"
    dist = f"torch-{stub_version}.dist-info"
    files = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {stub_version}\n"
        "Summary: resolver stand-in for the GPU machine's own torch (scripts/gpu_wheels.py); never installed\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/top_level.txt": "",
    }
    path = folder / f"torch-{stub_version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n")
    return stub_version


def copy_checkout(dst: Path) -> None:
    """The files `pip install .` would see: git's tracked + untracked-not-ignored ones, else the tree."""
    listed = None
    if (REPO / ".git").exists() and shutil.which("git"):
        proc = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
        )
        if proc.returncode == 0:
            listed = [p for p in proc.stdout.decode().split("\0") if p]
    if listed is None:
        listed = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            listed += [str(Path(root, f).relative_to(REPO)) for f in files]
    for rel in listed:
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


_SDIST_WHEELS: dict[tuple[str, str | None], Path | None] = {}


def sdist_wheel(pip: list[str], name: str, version: str | None, tmp: Path) -> Path | None:
    """A pure-Python wheel built here from PyPI's sdist, for a distribution that has no wheel at all.

    None when the version does have a binary wheel for this machine (it only lacks one for the target
    Python version) or when what builds is not pure Python (it would not run on another Python).
    """
    key = (name, version)
    if key in _SDIST_WHEELS:
        return _SDIST_WHEELS[key]
    spec = f"{name}=={version}" if version else name
    probe = tmp / "probe"
    result = None
    has_wheel = run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", spec, "-d", str(probe)], check=False)
    if has_wheel.returncode != 0:
        folder = tmp / "sdist"
        built = run(pip + ["wheel", "-q", "--no-deps", spec, "-w", str(folder)], check=False)
        if built.returncode == 0:
            for whl in sorted(folder.glob("*.whl")):
                n, v = wheel_name_version(whl.name)
                wild = version is not None and version.endswith(".*")
                fits = version is None or v == version or (wild and v.startswith(version[:-1]))
                if n == name and fits and whl.name.endswith("-none-any.whl"):
                    result = whl
    _SDIST_WHEELS[key] = result
    return result


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_describe() -> str:
    if not (REPO / ".git").exists() or not shutil.which("git"):
        return "unknown (not a git checkout)"
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return rev + (" + uncommitted changes" if dirty else "")


def platform_args(py: str) -> list[str]:
    tag = "cp" + py.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", py, "--implementation", "cp"]
    for abi in (tag, "abi3", "none"):
        args += ["--abi", abi]
    for plat in PLATFORMS:
        args += ["--platform", plat]
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "gpu_wheels", help="wheel folder (default gpu_wheels/)")
    ap.add_argument(
        "--pythons", nargs="+", default=["3.10", "3.11", "3.12"], help="CPython versions (default 3.10 3.11 3.12)"
    )
    ap.add_argument(
        "--constraints", type=Path, default=REPO / "constraints.txt", help="exact versions (default constraints.txt)"
    )
    ap.add_argument("--requirements", type=Path, default=REPO / "requirements.txt")
    ap.add_argument(
        "--clean", action="store_true", help="empty --out first (default: keep what is there; pip skips it)"
    )
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    out = args.out.resolve()
    if args.clean and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    pins = read_pins(args.constraints)
    torch_pin = pins.pop("torch", None)
    if torch_pin is None:
        raise SystemExit(f"gpu_wheels: {args.constraints} pins no torch version")
    requirements = read_requirement_names(args.requirements) + EXTRA_REQUIREMENTS
    # only the pins of packages that can be part of the result (not dev tools such as ruff or colcon)
    wanted = {canonical(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements}
    notes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="gpu_wheels_") as tmp_name:
        tmp = Path(tmp_name)
        stub_dir = tmp / "stub"
        stub_dir.mkdir()
        stub_version = make_stub_torch(stub_dir, torch_pin)
        (tmp / "sdist").mkdir()

        # 1. wheels built here: sam2 (sdist only, no CUDA extension) and this package
        env = dict(os.environ, SAM2_BUILD_CUDA="0")
        run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", SAM2_PIN, "-w", str(out)], env=env)
        src = tmp / "src"
        copy_checkout(src)
        for old in out.glob("rgbt_seg_ros-*.whl"):
            old.unlink()  # always rebuilt: the checkout may have changed since the last run
        run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(out)])

        # 2. per Python version: which constraints.txt pins have a wheel there, then the whole closure
        closure: dict[str, dict[str, str]] = {}
        for py in args.pythons:
            target = platform_args(py)
            usable = {}
            unpinned: list[tuple[str, str]] = []  # constraints.txt pins without a wheel for this Python
            for name, version in sorted(pins.items()):
                if name not in wanted:
                    continue
                proc = run(
                    pip
                    + [
                        "download",
                        "-q",
                        "--no-deps",
                        *target,
                        "--find-links",
                        str(out),
                        "-d",
                        str(out),
                        f"{name}=={version}",
                    ],
                    check=False,
                )
                if proc.returncode == 0:
                    usable[name] = version
                    continue
                made = sdist_wheel(pip, name, version, tmp)
                if made is not None:
                    shutil.copy2(made, out / made.name)
                    usable[name] = version
                    notes.append(f"{name}=={version}: PyPI has no wheel; built the pure-Python wheel from its sdist")
                else:
                    unpinned.append((name, version))
            cfile = tmp / f"constraints-{py}.txt"
            cfile.write_text("".join(f"{n}=={v}\n" for n, v in usable.items()) + f"torch=={stub_version}\n")
            reqfile = tmp / "requirements-gpu.txt"
            reqfile.write_text("\n".join(requirements) + "\n")
            dest = tmp / f"dl-{py}"
            dest.mkdir()
            for _attempt in range(10):  # a dependency that exists only as an sdist: build its wheel, retry
                proc = run(
                    pip + ["download", *target, "--find-links", str(out), "--find-links", str(stub_dir),
                           "--find-links", str(tmp / "sdist"), "-c", str(cfile), "-r", str(reqfile), "-d", str(dest)],
                    check=False,
                )  # fmt: skip
                if proc.returncode == 0:
                    break
                m = re.search(MISSING_DIST, proc.stderr)
                made = sdist_wheel(pip, canonical(m.group(1)), m.group(3), tmp) if m else None
                if made is None:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                    raise SystemExit(f"gpu_wheels: pip could not resolve the dependencies for Python {py}")
                notes.append(f"built a pure-Python wheel of {made.name} from its sdist (no wheel on PyPI)")
            else:
                raise SystemExit(f"gpu_wheels: pip could not resolve the dependencies for Python {py} (10 tries)")
            resolved = {}
            for whl in sorted(dest.glob("*.whl")):
                name, version = wheel_name_version(whl.name)
                if TORCH_FAMILY.match(name):
                    continue  # the stub (and never anything of torch's)
                resolved[name] = version
                if not (out / whl.name).exists():
                    shutil.copy2(whl, out / whl.name)
            for sd in dest.iterdir():
                if not sd.name.endswith(".whl"):
                    raise SystemExit(f"gpu_wheels: pip fetched a non-wheel {sd.name} for Python {py}")
            closure[py] = resolved
            for name, version in unpinned:
                chosen = resolved.get(name, "none")
                notes.append(f"python {py}: {name}=={version} (constraints.txt) has no wheel for it: {name} {chosen}")

    for stray in out.glob("torch-*.whl"):
        stray.unlink()
    elapsed = time.monotonic() - t_start
    write_manifest(out, args, closure, notes, torch_pin, elapsed)
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"gpu_wheels: {len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {out} ({elapsed:.0f} s)")
    print(f"gpu_wheels: see {out / 'MANIFEST.txt'}")
    return 0


def write_manifest(out: Path, args, closure: dict, notes: list[str], torch_pin: str, elapsed: float) -> None:
    wheels = sorted(out.glob("*.whl"))
    total = sum(p.stat().st_size for p in wheels)
    lines = [
        "# MANIFEST.txt: written by `make gpu-wheels` (scripts/gpu_wheels.py); how to use it: docs/gpu_check.md",
        f"created: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"checkout: {git_describe()}",
        f"built with: python {sys.version.split()[0]}, pip {_pip_version()}",
        f"python versions: {' '.join(args.pythons)} (CPython, manylinux x86_64, glibc 2.17 .. 2.28)",
        f"not included: torch (constraints.txt: {torch_pin}), its CUDA libraries (nvidia-*, triton) and its own "
        "dependencies: install torch first",
        f"wheels: {len(wheels)}, {total / 2**20:.1f} MiB; took {elapsed:.0f} s",
        "",
        "## install (what scripts/gpu_check.sh does; only what is missing, torch kept):",
        "#   pip install --no-index --find-links gpu_wheels -c <torch==installed> <missing requirements>",
        "#   pip install --no-index --find-links gpu_wheels --no-deps sam2==1.1.0 rgbt_seg_ros",
        "",
    ]
    if notes:
        lines += ["## notes"] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    for py, resolved in closure.items():
        lines += [f"## python {py}: {len(resolved)} distributions (+ sam2, rgbt_seg_ros)"]
        lines += [f"{n}=={v}" for n, v in sorted(resolved.items())] + [""]
    lines += ["## files (size in KiB, sha256)"]
    lines += [f"{p.name}  {p.stat().st_size / 1024:.0f}  {sha256(p)}" for p in wheels]
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")


def _pip_version() -> str:
    try:
        import pip

        return pip.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
