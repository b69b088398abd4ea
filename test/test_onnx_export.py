"""ONNX export of the model forward (static shapes, opset 17) and its parity with onnxruntime on CPU."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from rgbt_seg_ros.models.onnx_export import (  # noqa: E402
    compare_with_torch,
    export_checkpoint,
    onnx_session,
    static_interpolate_sizes,
)
from rgbt_seg_ros.tools import export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory, micro_checkpoint):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("onnx") / "micro.onnx"
    path, model, cfg = export_checkpoint(micro_checkpoint, out, opset=17)
    return path, model, cfg


def test_onnxruntime_matches_pytorch(exported):
    path, model, cfg = exported
    size = tuple(cfg["input_size"])
    parity = compare_with_torch(model, path, size)
    assert parity["shape"] == [1, 8, *size]
    assert parity["max_abs_diff"] < 1e-4 * max(1.0, parity["logit_abs_max"])
    assert parity["argmax_agreement"] > 0.999


def test_file_has_static_shapes_opset_and_metadata(exported):
    path, _, cfg = exported
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    h, w = cfg["input_size"]
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"rgb": [1, 3, h, w], "thermal": [1, 1, h, w], "valid": [1, 1, h, w]}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["rgbt_seg.backend"] == "sartm" and '"person"' in meta["rgbt_seg.classes"]
    assert [o.name for o in onnx_session(path).get_outputs()] == ["logits"]


def test_cli_exports_and_verifies(tmp_path, micro_checkpoint, capsys):
    args = argparse.Namespace(
        checkpoint=micro_checkpoint, out=tmp_path / "m.onnx", opset=17, size=[64, 96], batch=2,
        sam2_checkpoint=None, no_verify=False, time=2, threads=1, json=tmp_path / "parity.json",
    )  # fmt: skip
    assert export_onnx.run(args) == 0
    text = capsys.readouterr().out
    assert "64x96" in text and "batch 2" in text and "-> ok" in text and "interleaved runs" in text
    record = json.loads((tmp_path / "parity.json").read_text())
    assert record["ok"] and record["argmax_agreement"] > 0.999 and record["input_size"] == [64, 96]
    assert len(record["onnx_ms_all"]) == len(record["torch_ms_all"]) == 2 and record["onnx_to_torch_time"] > 0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [2, 8, 64, 96]


def test_cli_refuses_a_size_the_backend_cannot_run(tmp_path, micro_checkpoint, capsys):
    args = argparse.Namespace(
        checkpoint=micro_checkpoint, out=tmp_path / "m.onnx", opset=17, size=[100, 96], batch=1,
        sam2_checkpoint=None, no_verify=True, time=0, threads=None, json=None,
    )  # fmt: skip
    assert export_onnx.run(args) == 1
    assert "multiples of 32" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_static_interpolate_sizes_makes_sizes_ints_and_restores():
    original = F.interpolate
    x = torch.ones(1, 1, 8, 8)
    with static_interpolate_sizes():
        assert F.interpolate is not original
        y = F.interpolate(x, size=torch.Size([4, 4]), mode="area")
        assert y.shape == (1, 1, 4, 4)
    assert F.interpolate is original
