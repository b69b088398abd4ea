"""Checkpoint directories: bit-exact round trip, base-weight handling, and errors that name the problem."""

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rgbt_seg_ros.models import build_model, resolve_model_config
from rgbt_seg_ros.models.checkpoint import (
    BASE_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    export_standalone,
    load_checkpoint,
    save_checkpoint,
)

MICRO = "models/sartm_micro.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny tensors


def trained_micro(info, seed=0, cfg=None):
    """A micro model after two optimizer steps (so LoRA, BatchNorm stats etc. are non-trivial)."""
    torch.manual_seed(seed)
    cfg = cfg or resolve_model_config(MICRO)
    model = build_model(cfg, info, torch.nn.functional.normalize(torch.randn(info.num_classes, 384)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        out = model(torch.randn(2, 3, 64, 96), torch.randn(2, 1, 64, 96))
        target = torch.randint(0, info.num_classes, (2, 64, 96))
        loss = torch.nn.functional.cross_entropy(out["logits"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cfg


def outputs(model):
    g = torch.Generator().manual_seed(5)
    rgb, th = torch.randn(1, 3, 64, 96, generator=g), torch.randn(1, 1, 64, 96, generator=g)
    with torch.no_grad():
        return model(rgb, th)["logits"]


def test_round_trip_is_bit_exact(info, tmp_path):
    model, cfg = trained_micro(info)
    out_dir = save_checkpoint(model, cfg, info, tmp_path / "ckpt")
    assert (out_dir / MODEL_FILE).is_file() and (out_dir / CONFIG_FILE).is_file()
    loaded, loaded_cfg, loaded_info = load_checkpoint(out_dir)
    assert not loaded.training
    assert loaded_info.class_names == info.class_names
    assert (loaded_info.palette == info.palette).all()
    assert loaded_cfg["input_size"] == cfg["input_size"]
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(outputs(model), outputs(loaded))
    # the LoRA of both modalities and the text buffer travel in the file
    keys = set(load_file(str(out_dir / MODEL_FILE)))
    assert "text_embeddings" in keys
    assert any(".lora_B.thermal." in k for k in keys) and any(".lora_B.rgb." in k for k in keys)
    config = yaml.safe_load((out_dir / CONFIG_FILE).read_text())
    assert config["backend"] == "sartm" and config["base_weights"] is None
    assert [c["name"] for c in config["classes"]["classes"]] == list(info.class_names)


@pytest.fixture
def base_setup(info, tmp_path):
    """A micro model built on frozen base weights written in the official SAM2 layout."""
    torch.manual_seed(11)
    donor = build_model(resolve_model_config(MICRO), info, torch.zeros(info.num_classes, 384))
    base = tmp_path / "sam2_micro.pt"
    torch.save({"model": donor.sam2_state_dict()}, base)
    cfg = resolve_model_config(MICRO)
    cfg["encoder"].update(checkpoint=str(base), freeze=True)
    cfg["decoder"]["freeze_transformer"] = True
    model, cfg = trained_micro(info, seed=2, cfg=cfg)
    return model, cfg, base


def test_frozen_base_weights_stay_out_of_the_file_and_are_verified(info, tmp_path, base_setup):
    model, cfg, base = base_setup
    out_dir = save_checkpoint(model, cfg, info, tmp_path / "ckpt")
    keys = set(load_file(str(out_dir / MODEL_FILE)))
    assert not any(k.startswith("image_encoder.") and ".lora_" not in k for k in keys)
    assert not any(k.startswith("sam_head.mask_decoder.transformer.") for k in keys)
    assert any(k.startswith("sam_head.mask_decoder.conv_s0.") for k in keys)  # base-initialised but trained
    config = yaml.safe_load((out_dir / CONFIG_FILE).read_text())
    assert config["base_weights"]["sha256"] and config["base_weights"]["sam2_config"] == "hiera_tiny"

    loaded, _, _ = load_checkpoint(out_dir)  # finds the base file at its recorded path
    assert torch.equal(outputs(model), outputs(loaded))

    moved = tmp_path / "elsewhere.pt"
    base.rename(moved)
    with pytest.raises(FileNotFoundError, match="sam2_checkpoint"):
        load_checkpoint(out_dir)
    loaded, _, _ = load_checkpoint(out_dir, sam2_checkpoint=moved)
    assert torch.equal(outputs(model), outputs(loaded))

    other = tmp_path / "other.pt"
    state = torch.load(moved, weights_only=True)
    state["model"]["image_encoder.trunk.pos_embed"] = state["model"]["image_encoder.trunk.pos_embed"] + 1
    torch.save(state, other)
    with pytest.raises(ValueError, match="not the ones checkpoint"):
        load_checkpoint(out_dir, sam2_checkpoint=other)


def test_standalone_export_runs_without_the_base_file(info, tmp_path, base_setup):
    model, cfg, base = base_setup
    ckpt = save_checkpoint(model, cfg, info, tmp_path / "ckpt")
    standalone = export_standalone(ckpt, tmp_path / "standalone")
    assert (standalone / BASE_FILE).is_file()
    record = yaml.safe_load((standalone / CONFIG_FILE).read_text())["base_weights"]
    original = yaml.safe_load((ckpt / CONFIG_FILE).read_text())["base_weights"]
    assert record["sha256"] == original["sha256"] and record["file"] == BASE_FILE
    base.unlink()
    loaded, _, _ = load_checkpoint(standalone)
    assert torch.equal(outputs(model), outputs(loaded))


def _edit_config(path, edit):
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_wrong_backend_is_named(info, tmp_path):
    model, cfg = trained_micro(info)
    out_dir = save_checkpoint(model, cfg, info, tmp_path / "ckpt")

    def to_other_backend(c):
        c["backend"] = "nonesuch"
        c["model"]["backend"] = "nonesuch"

    _edit_config(out_dir / CONFIG_FILE, to_other_backend)
    with pytest.raises(ValueError, match="unknown model backend 'nonesuch'"):
        load_checkpoint(out_dir)
    with pytest.raises(ValueError, match="expected 'sartm'"):
        load_checkpoint(out_dir, backend="sartm")


def test_wrong_class_count_is_named(info, tmp_path):
    model, cfg = trained_micro(info)
    out_dir = save_checkpoint(model, cfg, info, tmp_path / "ckpt")
    _edit_config(out_dir / CONFIG_FILE, lambda c: c["classes"]["classes"].pop())
    with pytest.raises(ValueError, match=f"trained for {info.num_classes} classes .* lists {info.num_classes - 1}"):
        load_checkpoint(out_dir)


def test_missing_and_unexpected_keys_are_named(info, tmp_path):
    model, cfg = trained_micro(info)
    out_dir = save_checkpoint(model, cfg, info, tmp_path / "ckpt")
    path = out_dir / MODEL_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    dropped = "aux_head.classifier.weight"
    del tensors[dropped]
    tensors["stray.weight"] = torch.zeros(2)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"missing key\(s\) aux_head.classifier.weight.*unexpected key\(s\) stray"):
        load_checkpoint(out_dir)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_checkpoint(tmp_path / "empty")
