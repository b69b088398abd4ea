"""SAM2's ``no_mem_embed``: read from the official file, added where SAM2's image predictor adds it.

SAM2's image predictor (``set_image``) runs ``forward_image``, flattens the maps with
``_prepare_backbone_features``, adds ``no_mem_embed`` to the stride-16 map when the model has
``directly_add_no_mem_embed`` (true in every ``sam2.1_hiera_*`` config) and reshapes it into
``_features["image_embed"]``. The predictor module itself needs torchvision, which this project
does not install, so :func:`sam2_image_features` repeats those lines of ``set_image`` on the
model built by sam2's own ``build_sam2``; the feature sizes come from the maps, not from the
predictor's 1024x1024 constants, so a small input suffices.
"""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rgbt_seg_ros.models import build_model, dataset_info_for, resolve_model_config
from rgbt_seg_ros.models.checkpoint import (
    ADDED_SINCE_FORMAT_1,
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    FORMAT_1,
    MODEL_FILE,
    load_checkpoint,
    save_checkpoint,
)
from rgbt_seg_ros.models.sam2_checkpoint import NO_MEM_KEY, official_to_parts

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "models" / "sartm_micro.yaml"
KEY = "sam_head.no_mem_embed"
SIZE = (96, 128)  # multiples of 32; the stride-16 map is 6x8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """sam2's own SAM2.1 Hiera-tiny (random init, non-zero no_mem_embed), saved as an official file."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    sam = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    assert sam.directly_add_no_mem_embed  # what the official configs say
    with torch.no_grad():
        sam.no_mem_embed.copy_(torch.randn_like(sam.no_mem_embed))
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sam.state_dict()}, path)
    return sam, path


@pytest.fixture(scope="module")
def ours(official):
    """Our SARTM on that file through the production config (``encoder.checkpoint``)."""
    _, path = official
    cfg = resolve_model_config(REPO / "models" / "sartm_tiny.yaml")
    cfg["encoder"]["checkpoint"] = str(path)
    info = dataset_info_for(cfg, None)
    torch.manual_seed(1)
    return build_model(cfg, info).eval(), cfg, info


def sam2_image_features(sam, image):
    """``SAM2ImagePredictor.set_image``'s feature computation: (image_embed, high_res_feats)."""
    backbone_out = sam.forward_image(image)
    _, vision_feats, _, feat_sizes = sam._prepare_backbone_features(backbone_out)
    if sam.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + sam.no_mem_embed
    feats = [
        feat.permute(1, 2, 0).view(1, -1, *feat_size) for feat, feat_size in zip(vision_feats[::-1], feat_sizes[::-1])
    ][::-1]
    return feats[-1], feats[:-1]


def test_image_embedding_equals_sam2_image_predictor(official, ours):
    sam, path = official
    model, _, _ = ours
    assert torch.equal(model.sam_head.no_mem_embed, sam.no_mem_embed)
    assert tuple(model.sam_head.no_mem_embed.shape) == (1, 1, 256)
    image = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image_embed, (high0, high1) = sam2_image_features(sam, image)
        ffp, ifp, sfm = model._encode(image, "rgb")  # LoRA B starts at zero: the base encoder
        embedding = model.sam_head.image_embedding(sfm)
    assert embedding.shape == image_embed.shape == (1, 256, SIZE[0] // 16, SIZE[1] // 16)
    torch.testing.assert_close(embedding, image_embed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ifp, high1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ffp, high0, atol=1e-5, rtol=1e-5)
    # without the addition the raw neck output is far from SAM2's image embedding
    assert (sfm - image_embed).abs().max() > 0.5


def test_the_decoder_sees_the_fused_map_plus_no_mem_embed(ours, monkeypatch):
    model, _, _ = ours
    decoder = model.sam_head.mask_decoder
    seen = {}
    original = decoder.predict_masks

    def spy(**kwargs):
        seen["image_embeddings"] = kwargs["image_embeddings"]
        return original(**kwargs)

    monkeypatch.setattr(decoder, "predict_masks", spy)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *SIZE, generator=g), torch.rand(1, 1, *SIZE, generator=g))
    sfm = out["features"]["sfm"]
    nme = model.sam_head.no_mem_embed.reshape(1, -1, 1, 1)
    assert torch.equal(seen["image_embeddings"], sfm + nme)
    torch.testing.assert_close(seen["image_embeddings"] - sfm, nme.expand_as(sfm), atol=1e-5, rtol=0)
    assert not torch.allclose(seen["image_embeddings"], sfm, atol=0.1)


def test_frozen_with_the_decoder_and_written_back(official, ours, tmp_path):
    sam, path = official
    model, cfg, info = ours
    assert not model.sam_head.no_mem_embed.requires_grad
    assert KEY in model.frozen_base_state_keys()
    exported = model.sam2_state_dict()
    assert torch.equal(exported[NO_MEM_KEY], sam.no_mem_embed)
    assert torch.equal(official_to_parts(exported).no_mem_embed, sam.no_mem_embed)

    out_dir = save_checkpoint(model, cfg, info, tmp_path / "ckpt", base_weights_path=path)
    assert KEY not in load_file(str(out_dir / MODEL_FILE))  # it comes from the base file
    assert yaml.safe_load((out_dir / CONFIG_FILE).read_text())["format"] == CHECKPOINT_FORMAT
    loaded, _, _ = load_checkpoint(out_dir)
    assert torch.equal(loaded.sam_head.no_mem_embed, sam.no_mem_embed)


def micro(seed=0, cfg=None):
    torch.manual_seed(seed)
    cfg = cfg or resolve_model_config(MICRO)
    info = dataset_info_for(cfg, None)
    return build_model(cfg, info, torch.zeros(info.num_classes, 384)), cfg, info


def test_random_init_micro_starts_at_zero_and_trains(tmp_path):
    model, cfg, info = micro()
    nme = model.sam_head.no_mem_embed
    assert nme.requires_grad and not nme.any()
    assert KEY not in model.frozen_base_state_keys()
    model.train()
    out = model(torch.randn(2, 3, 64, 96), torch.rand(2, 1, 64, 96))
    torch.nn.functional.cross_entropy(out["logits"], torch.randint(0, info.num_classes, (2, 64, 96))).backward()
    assert nme.grad is not None and nme.grad.abs().sum() > 0
    out_dir = save_checkpoint(model, cfg, info, tmp_path / "ckpt")
    assert KEY in load_file(str(out_dir / MODEL_FILE))


def _drop_tensor(ckpt, key, fmt=None):
    """Remove ``key`` from the checkpoint's tensors; optionally rewrite its format."""
    path = ckpt / MODEL_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    assert key in tensors
    del tensors[key]
    save_file(tensors, str(path), metadata=meta)
    if fmt is not None:
        config = yaml.safe_load((ckpt / CONFIG_FILE).read_text())
        config["format"] = fmt
        (ckpt / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def test_the_demo_checkpoint_still_loads_and_other_missing_keys_are_refused(tmp_path):
    demo = REPO / "models" / "demo"
    model, _, _ = load_checkpoint(demo)
    if yaml.safe_load((demo / CONFIG_FILE).read_text())["format"] == FORMAT_1:
        assert KEY not in load_file(str(demo / MODEL_FILE))
        assert not model.sam_head.no_mem_embed.any()
    copy = tmp_path / "demo"
    shutil.copytree(demo, copy)
    _drop_tensor(copy, "aux_head.classifier.bias")
    with pytest.raises(ValueError, match=r"missing key\(s\) aux_head.classifier.bias"):
        load_checkpoint(copy)


def test_only_format_1_may_lack_the_added_keys(tmp_path):
    assert KEY in ADDED_SINCE_FORMAT_1
    model, cfg, info = micro()
    with torch.no_grad():
        model.sam_head.no_mem_embed.fill_(0.5)
    new = save_checkpoint(model, cfg, info, tmp_path / "new")
    _drop_tensor(new, KEY)
    with pytest.raises(ValueError, match=r"missing key\(s\) sam_head.no_mem_embed"):
        load_checkpoint(new)

    old = save_checkpoint(model, cfg, info, tmp_path / "old")
    _drop_tensor(old, KEY, fmt=FORMAT_1)
    loaded, _, _ = load_checkpoint(old)
    assert not loaded.sam_head.no_mem_embed.any()
    _drop_tensor(old, "aux_head.classifier.bias")  # format 1 excuses only the added keys
    with pytest.raises(ValueError, match=r"missing key\(s\) aux_head.classifier.bias"):
        load_checkpoint(old)


def test_format_1_on_base_weights_keeps_the_zero_it_ran_with(tmp_path):
    """A format-1 model on frozen base weights never saw no_mem_embed, even if the base file has it."""
    donor, _, _ = micro(seed=11)
    base_state = donor.sam2_state_dict()
    base_state[NO_MEM_KEY] = torch.randn_like(base_state[NO_MEM_KEY])
    base = tmp_path / "sam2_micro.pt"
    torch.save({"model": base_state}, base)
    cfg = resolve_model_config(MICRO)
    cfg["encoder"].update(checkpoint=str(base), freeze=True)
    cfg["decoder"]["freeze_transformer"] = True
    model, cfg, info = micro(seed=2, cfg=cfg)
    assert torch.equal(model.sam_head.no_mem_embed, base_state[NO_MEM_KEY])
    ckpt = save_checkpoint(model, cfg, info, tmp_path / "ckpt")
    loaded, _, _ = load_checkpoint(ckpt)
    assert torch.equal(loaded.sam_head.no_mem_embed, base_state[NO_MEM_KEY])

    config = yaml.safe_load((ckpt / CONFIG_FILE).read_text())
    config["format"] = FORMAT_1
    (ckpt / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    loaded, _, _ = load_checkpoint(ckpt)
    assert not loaded.sam_head.no_mem_embed.any()

    # a base file without the key (a format-1 standalone export) loads it as zeros
    del base_state[NO_MEM_KEY]
    torch.save({"model": base_state}, base)
    model, _, _ = micro(seed=2, cfg=cfg)
    assert not model.sam_head.no_mem_embed.any()
