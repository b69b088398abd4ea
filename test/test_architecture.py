"""The import rules of docs/architecture.md, checked on the package's source (every import, also the
lazy ones inside functions): ROS only in ``ros/``, ``models/`` standing on its own, ``training/`` used
only by the training commands, the frame path free of evaluation, training and tools."""

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = "rgbt_seg_ros"
ROS_PACKAGES = {
    "rclpy",
    "launch",
    "launch_ros",
    "launch_pytest",
    "message_filters",
    "cv_bridge",
    "ament_index_python",
    "builtin_interfaces",
    "rcl_interfaces",
}
# modules allowed to import training/: the training commands (``bench train`` is tools/bench.py's train target)
TRAINING_COMMANDS = {"tools.train", "tools.experiments", "tools.bench"}


def is_ros(module: str) -> bool:
    top = module.split(".")[0]
    return top in ROS_PACKAGES or top.endswith(("_msgs", "_srvs", "_interfaces"))


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``module`` imports (absolute names; package-internal ones without the package prefix)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            if not node.module:  # from .. import a, b: submodules
                found |= {f"{name}.{a.name}" for a in node.names}
    return {n[len(PACKAGE) + 1 :] if n.startswith(PACKAGE + ".") else n for n in found if n != PACKAGE}


def package_imports(root: Path) -> dict[str, set[str]]:
    """module (without the package prefix) -> what it imports."""
    graph = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        is_package = rel.name == "__init__"
        parts = rel.parts[:-1] if is_package else rel.parts
        module = ".".join(parts)
        graph[module[len(PACKAGE) + 1 :] or "__init__"] = imports_of(path.read_text(), module, is_package)
    return graph


ROOMS = {"pipeline", "models", "data", "evaluation", "training", "bench", "ros", "tools"}


def room(module: str) -> str:
    """The subpackage a module (or a subpackage itself) lives in; "" for the package's root modules."""
    top = module.split(".")[0]
    return top if top in ROOMS else ""


def violations(graph: dict[str, set[str]]) -> list[str]:
    internal = set(graph)
    bad = []
    for module, deps in graph.items():
        own = {d for d in deps if d in internal or room(d)}
        rooms = {room(d) for d in own}
        if room(module) != "ros":
            bad += [f"{module} imports {d}: ROS belongs in ros/" for d in sorted(deps - own) if is_ros(d)]
        if room(module) == "models":
            bad += [
                f"{module} imports {d}: models/ stands on its own"
                for d in sorted(own)
                if room(d) != "models" and d not in {"resources"}
            ]
        if room(module) != "training" and module not in TRAINING_COMMANDS and "training" in rooms:
            bad.append(f"{module} imports training/: only the training commands may")
        if room(module) == "pipeline":
            bad += [
                f"{module} imports {d}: the frame path needs only models/"
                for d in sorted(own)
                if room(d) not in {"pipeline", "models", ""}
            ]
        if room(module) in {"evaluation", "data", "bench"}:
            bad += [f"{module} imports {d}" for d in sorted(own) if room(d) in {"ros", "tools", "training"}]
    return bad


def test_the_package_keeps_the_import_rules():
    assert violations(package_imports(REPO)) == []


def test_the_rooms_are_the_ones_the_architecture_names():
    rooms = {p.name for p in (REPO / PACKAGE).iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert rooms == ROOMS
    text = (REPO / "docs" / "architecture.md").read_text()
    for name in rooms:
        assert f"`{name}/`" in text, f"docs/architecture.md does not describe {name}/"


@pytest.mark.parametrize(
    "module, source, rule",
    [
        ("pipeline.imaging", "def f():\n    from sensor_msgs.msg import Image\n", "ROS belongs in ros/"),
        ("data.bags", "import rclpy\n", "ROS belongs in ros/"),
        ("models.sartm", "from ..pipeline.segmenter import Segmenter\n", "models/ stands on its own"),
        ("models.sartm", "from ..training.losses import x\n", "models/ stands on its own"),
        ("evaluation.replay", "def f():\n    from ..training.trainer import Trainer\n", "only the training"),
        ("pipeline.frame_flow", "from ..evaluation import metrics\n", "the frame path needs only models/"),
    ],
)
def test_the_rules_catch_a_wrong_import_also_inside_a_function(module, source, rule):
    graph = package_imports(REPO)
    path = module.split(".")
    graph[module] = graph[module] | imports_of(source, ".".join([PACKAGE, *path]))
    assert any(rule in v for v in violations(graph)), violations(graph)


TRAINER_MODULES = ("trainer", "run_setup", "train_data", "loop", "validation")


@pytest.mark.parametrize("name", TRAINER_MODULES)
def test_the_trainer_is_split_into_functions_a_reader_can_hold(name):
    """The trainer's modules (setup, data, loop, validation and checkpoints) keep every function under 80 lines."""
    tree = ast.parse((REPO / PACKAGE / "training" / f"{name}.py").read_text())
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []
