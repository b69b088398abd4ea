"""Node parameters: the schema, the shipped parameter file, and validation messages."""

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from rgbt_seg_ros.pipeline.params import SPECS, defaults, load_param_file, validate


def test_shipped_parameter_file_sets_every_parameter_with_valid_values():
    values = load_param_file(REPO / "config" / "segment.yaml")
    with open(REPO / "config" / "segment.yaml") as f:
        tree = yaml.safe_load(f)["/**"]["ros__parameters"]

    def has(name):
        node = tree
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [s.name for s in SPECS if not has(s.name)]
    assert missing == []  # the file documents every parameter the node declares
    assert values["model.checkpoint"] == "models/demo" and values["sync.slop"] == 0.05


def test_shipped_parameter_file_equals_the_declared_defaults():
    # a node started with no parameter file behaves exactly like one started with config/segment.yaml
    assert load_param_file(REPO / "config" / "segment.yaml") == defaults()
    assert defaults()["model.checkpoint"] == "models/demo"


def test_old_topic_parameters_are_refused_with_the_remapping_to_use(tmp_path: Path):
    old = tmp_path / "old.yaml"
    old.write_text("/**:\n  ros__parameters:\n    topics:\n      rgb: /camera/color/image_raw\n")
    with pytest.raises(ValueError, match=r"old.yaml: topics.rgb is no longer a parameter.*-r rgb/image:="):
        load_param_file(old)


def test_every_parameter_has_a_description_and_consistent_default():
    for spec in SPECS:
        assert len(spec.description) > 10, spec.name
        assert validate(spec.name, spec.default) is None, spec.name


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("sync.slop", 5.0, "sync.slop must be <= 1.0"),
        ("qos.depth", 0, "qos.depth must be >= 1"),
        ("model.device", "tpu", "model.device must be one of auto, cpu, cuda"),
        ("output.overlay", "yes", "must be of type bool"),
        ("output.palette", ["red"], "must be a list of integers"),
        ("nope.nope", 1, "unknown parameter"),
    ],
)
def test_validation_messages(name, value, fragment):
    assert fragment in validate(name, value)


def test_param_file_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**:\n  ros__parameters:\n    sync:\n      slop: 3.0\n")
    with pytest.raises(ValueError, match=r"bad.yaml: sync.slop must be <= 1.0"):
        load_param_file(bad)
    other_node = tmp_path / "other.yaml"
    other_node.write_text("other_node:\n  ros__parameters:\n    sync:\n      slop: 3.0\n")
    assert load_param_file(other_node)["sync.slop"] == 0.05  # entries for other nodes do not apply
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_param_file(tmp_path / "missing.yaml")


def test_the_docs_document_every_parameter():
    pages = (REPO / "README.md").read_text() + "".join(f.read_text() for f in sorted((REPO / "docs").glob("*.md")))
    missing = [s.name for s in SPECS if f"`{s.name}`" not in pages]
    assert missing == []


def test_every_problem_of_a_file_is_reported_at_once_and_ros_parameters_are_accepted(tmp_path: Path):
    f = tmp_path / "robot.yaml"
    f.write_text(
        "/**:\n  ros__parameters:\n    use_sim_time: true\n    qos_overrides:\n      /diagnostics:\n"
        "        publisher:\n          depth: 3\n    sync:\n      slop: 3.0\n      queue_size: five\n"
        "    output:\n      overlay: 'yes'\n    model:\n      devise: cpu\n"
    )
    with pytest.raises(ValueError) as err:
        load_param_file(f)
    text = str(err.value)
    assert text.startswith(f"{f} has 4 problems")
    for fragment in (
        "sync.slop must be <= 1.0",
        "sync.queue_size must be of type int",
        "output.overlay must be of type bool",
        "unknown parameter 'model.devise'",
    ):
        assert fragment in text
    problems: list[str] = []
    values = load_param_file(f, problems=problems)  # the node's policy: defaults for what is refused
    assert len(problems) == 4 and all(p.startswith(f"{f}: ") for p in problems)
    assert values == defaults()
    assert "using the default 0.05" in problems[0]


def test_a_file_that_is_not_yaml_is_named(tmp_path: Path):
    f = tmp_path / "broken.yaml"
    f.write_text("/**:\n  ros__parameters: [\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML"):
        load_param_file(f)
