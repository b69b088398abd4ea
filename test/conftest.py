"""Shared test fixtures: paths of the installed console scripts and a ROS environment for subprocesses."""

import itertools
import os
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

# What `make test` exports, so that a plain `.venv/bin/python -m pytest` behaves the same.
os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests are skipped, with the reason "no CUDA device", where torch sees no GPU."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in cuda_items:
        item.add_marker(skip)


def script(name: str) -> str:
    """Absolute path of a console script installed next to this interpreter (the project venv)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install the package first (make install)")
    return str(path)


_DOMAINS = itertools.count()


@pytest.fixture
def ros_env(tmp_path):
    """Environment for node processes: a ROS domain of its own per test, large-data DDS transport.

    No two tests of a session share a domain (up to 200 of them; a hash of the test's name did collide), so a
    node that an earlier test left behind, or its DDS state, cannot reach a later test."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(20 + (os.getpid() + next(_DOMAINS)) % 200)
    env["FASTDDS_BUILTIN_TRANSPORTS"] = "LARGE_DATA"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("AMENT_PREFIX_PATH", sys.prefix)
    env["ROS_LOG_DIR"] = str(tmp_path / "ros_log")
    return env


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory):
    """A randomly initialised SARTM micro checkpoint written by the project's own save path (fast to load)."""
    return make_micro_checkpoint(tmp_path_factory.mktemp("ckpt") / "micro")


def make_micro_checkpoint(out_dir: Path, input_size=None, seed: int = 0, moved: bool = False) -> Path:
    """``moved``: LoRA B and the fusion gates drawn from N(0, 0.1) instead of their zero init, so both inputs
    reach the logits (a fresh model's thermal path starts closed)."""
    import torch

    from rgbt_seg_ros.models import build_model, dataset_info_for, resolve_model_config
    from rgbt_seg_ros.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    cfg = resolve_model_config(REPO / "models" / "sartm_micro.yaml")
    if input_size is not None:
        cfg["input_size"] = list(input_size)
    info = dataset_info_for(cfg, None)
    text = torch.nn.functional.normalize(torch.randn(info.num_classes, 384), dim=1)
    model = build_model(cfg, info, text)
    if moved:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name or ".gate" in name:
                    p.normal_(0, 0.1)
    save_checkpoint(model, cfg, info, out_dir)
    return out_dir


def write_params(path: Path, **overrides) -> Path:
    """A parameter file: the shipped config/segment.yaml with dotted-name overrides."""
    import yaml

    with open(REPO / "config" / "segment.yaml") as f:
        data = yaml.safe_load(f)
    params = data["/**"]["ros__parameters"]
    for name, value in overrides.items():
        node = params
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(data))
    return path


def micro_params_file(path: Path, checkpoint: Path, **extra) -> Path:
    """A parameter file for a node process on the micro checkpoint: CPU, fixed thermal scaling, short pairing wait."""
    settings = {
        "model.checkpoint": str(checkpoint),
        "model.device": "cpu",
        "thermal.mode": "fixed",
        "thermal.min": 25000.0,
        "thermal.max": 33000.0,
        "sync.max_wait": 0.05,
    }
    return write_params(path, **{**settings, **extra})


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread avoids sync overhead dominating."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def info():
    """The synthetic class set (8 classes)."""
    from rgbt_seg_ros.models.classes import load_dataset_info

    return load_dataset_info("synthetic")
