"""SARTM backend: shapes, what trains, thermal influence, auxiliary head, SAM2 weight remap.

Uses models/sartm_micro.yaml (random-init 5-block Hiera) so that every test runs in well
under a second of compute; the real SAM2.1 Hiera-tiny layout is checked against the sam2
package's own SAM2Base state dict.
"""

import copy
import os

import pytest
import torch
from backend_contract import BackendCase, BackendContract, decoder_inputs, randomize_named

from rgbt_seg_ros.models import SARTM, available_backends, build_model, resolve_model_config
from rgbt_seg_ros.models.classes import DatasetInfo, load_dataset_info
from rgbt_seg_ros.models.heads import SAM2MaskDecoderHead
from rgbt_seg_ros.models.sam2_checkpoint import (
    DECODER_SHARED_PARTS,
    official_to_parts,
    read_official_state_dict,
)
from rgbt_seg_ros.models.sam2_encoder import build_image_encoder

MICRO = "models/sartm_micro.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny tensors


@pytest.fixture(scope="module")
def text(info):
    return torch.nn.functional.normalize(torch.randn(info.num_classes, 384, generator=torch.Generator().manual_seed(0)))


def micro_cfg(freeze_transformer=False, **encoder):
    cfg = resolve_model_config(MICRO)
    cfg["encoder"].update(encoder)
    cfg["decoder"]["freeze_transformer"] = freeze_transformer
    return cfg


def make_micro(info, text, seed=0, freeze_transformer=False, **encoder):
    torch.manual_seed(seed)
    return build_model(micro_cfg(freeze_transformer, **encoder), info, text)


def randomize_lora(model, seed=1):
    """LoRA B and the fusion's gates (fusion.identity_init) start at zero; give them values so that adapters
    change the output and thermal reaches it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or ".gate" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def pair(b=1, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randn(b, 1, h, w, generator=g)


def write_official(model, path, extra=True):
    """Write ``model``'s SAM2 parts as an official-layout .pt (state dict under "model")."""
    state = model.sam2_state_dict()
    if extra:  # an official file also holds memory modules and prompt tensors we ignore
        state["memory_attention.layers.0.norm1.weight"] = torch.ones(4)
        state["sam_prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 4)
    torch.save({"model": state}, path)
    return path


def test_sartm_is_registered():
    assert "sartm" in available_backends()


@pytest.mark.parametrize("size", [(64, 96), (96, 64)])
def test_output_shapes_square_and_non_square(info, text, size):
    model = make_micro(info, text).eval()
    h, w = size
    rgb, th = pair(2, h, w)
    with torch.no_grad():
        out = model(rgb, th)
    c = info.num_classes
    assert out["logits"].shape == (2, c, h, w)
    assert out["s0"].shape == (2, c, h // 4, w // 4)
    assert out["s1"].shape == (2, c, h // 4, w // 4)
    d = model.image_encoder.neck.d_model
    assert out["features"]["sfm"].shape == (2, d, h // 16, w // 16)
    assert out["features"]["ifp"].shape == (2, d // 4, h // 8, w // 8)
    assert out["features"]["ffp"].shape == (2, d // 8, h // 4, w // 4)
    assert torch.equal(out["text_embeddings"], text)
    assert torch.isfinite(out["logits"]).all()


def test_class_count_follows_dataset(text):
    mfnet = load_dataset_info("mfnet")
    model = build_model(micro_cfg(), mfnet, torch.randn(mfnet.num_classes, 384)).eval()
    with torch.no_grad():
        out = model(*pair())
    assert out["logits"].shape[1] == mfnet.num_classes
    assert model.sam_head.mask_decoder.mask_tokens.weight.shape[0] == mfnet.num_classes


def test_combine_modes_select_heads(info, text):
    model = make_micro(info, text).eval()
    rgb, th = pair()
    results = {}
    for mode in ("s0", "s1", "mean"):
        model.combine = mode
        with torch.no_grad():
            results[mode] = model(rgb, th)
    up = torch.nn.functional.interpolate(results["s0"]["s0"], size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(results["s0"]["logits"], up, atol=1e-6)
    mean = 0.5 * results["mean"]["s0"] + 0.5 * results["mean"]["s1"]
    up = torch.nn.functional.interpolate(mean, size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(results["mean"]["logits"], up, atol=1e-5)
    assert not torch.allclose(results["s0"]["logits"], results["s1"]["logits"])


def test_bad_inputs_raise_clear_errors(info, text):
    model = make_micro(info, text)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(*pair(1, 60, 96))
    rgb, _ = pair()
    with pytest.raises(ValueError, match="thermal must be"):
        model(rgb, torch.zeros(1, 3, 64, 96))
    with pytest.raises(ValueError, match="valid must be"):
        model(*pair(), valid=torch.ones(1, 1, 32, 32))


def test_thermal_reaches_fusion_and_its_lora_gets_gradient(info, text):
    model = make_micro(info, text).eval()
    randomize_lora(model)
    rgb, th = pair()
    with torch.no_grad():
        base = model(rgb, th)["logits"]
        other_thermal = model(rgb, th.flip(-1) * 2.0)["logits"]
    assert (base - other_thermal).abs().max() > 1e-3

    model.zero_grad()
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    model(rgb, th)["logits"].logsumexp(1).mean().backward()
    assert all(p.requires_grad for p in lora)  # switching adapters did not freeze either one
    for adapter in ("rgb", "thermal"):
        grads = [p.grad for n, p in model.named_parameters() if f".lora_A.{adapter}." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), adapter


def test_each_adapter_only_acts_on_its_modality(info, text):
    model = make_micro(info, text).eval()
    rgb, th = pair()
    with torch.no_grad():
        before = model(rgb, th)
        feats_th = [f.clone() for f in model._encode(th.expand(-1, 3, -1, -1), "thermal")]
        for name, p in model.named_parameters():
            if ".lora_B.rgb." in name:
                p.add_(0.5)
        after_th = model._encode(th.expand(-1, 3, -1, -1), "thermal")
        after = model(rgb, th)
    for a, b in zip(feats_th, after_th):
        assert torch.equal(a, b)  # the thermal pass does not use the rgb adapter
    assert (before["logits"] - after["logits"]).abs().max() > 1e-4


def _two_pass_and_batched(model, *inputs):
    model.batched_inference = False
    a = model(*inputs)
    model.batched_inference = True
    return a, model(*inputs)


def test_batched_modalities_equal_two_passes(info, text):
    """Eval mode runs [rgb; thermal] through the trunk once, each half with its adapter merged into a
    fused qkv weight: the same function as the two peft passes, to float rounding."""
    model = make_micro(info, text).eval()
    randomize_lora(model)
    rgb, th = pair(2, seed=3)
    valid = torch.ones(2, 1, 64, 96)
    valid[1, :, :, :40] = 0
    with torch.no_grad():
        a, b = _two_pass_and_batched(model, rgb, th, valid)
    assert model.batched_inference and model.image_encoder.trunk.blocks[0].attn._group_w is None  # restored
    for key in ("logits", "s0", "s1"):
        assert (a[key] - b[key]).abs().max() < 1e-4, key
    for key in ("features_rgb", "features_thermal"):
        for level in a[key]:
            assert (a[key][level] - b[key][level]).abs().max() < 1e-4, (key, level)
    assert torch.equal(a["logits"].argmax(1), b["logits"].argmax(1))


def test_batched_merged_weights_follow_weight_changes(info, text):
    """The merged-LoRA cache is keyed on the source tensors' versions: new weights are never stale,
    and each half of the batch uses its own modality's adapter."""
    from rgbt_seg_ros.models.lora import modality_batch

    model = make_micro(info, text).eval()
    rgb, th = pair()

    def encode_both():
        with torch.no_grad(), modality_batch(model.image_encoder.trunk):
            return model.image_encoder(torch.cat([rgb, th.expand(-1, 3, -1, -1)]))["backbone_fpn"]

    first = encode_both()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B.rgb." in name:
                p.add_(0.5)
    second = encode_both()
    for a, b in zip(first, second):
        assert torch.equal(a[1:], b[1:])  # the thermal half does not use the rgb adapter
        assert (a[:1] - b[:1]).abs().max() > 1e-4  # the rgb half sees the new rgb adapter at once
    # loading another state dict (copy_ into the same tensors) also refreshes the merged weights
    other = make_micro(info, text, seed=5).eval()
    randomize_lora(other, seed=7)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        a, b = _two_pass_and_batched(model, rgb, th)
        ref = other(rgb, th)
    assert (b["logits"] - ref["logits"]).abs().max() < 1e-4 and (a["logits"] - b["logits"]).abs().max() < 1e-4


def test_batched_gradients_equal_two_pass_gradients(info, text):
    """In eval mode with gradients on (attribution, BN-frozen fine-tuning) the merge is in the graph."""
    model = make_micro(info, text).eval()
    randomize_lora(model)
    rgb, th = pair(seed=4)
    grads = []
    for flag in (False, True):
        model.batched_inference = flag
        model.zero_grad()
        model(rgb, th)["logits"].logsumexp(1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if ".lora_" in n})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6), name
    attn = model.image_encoder.trunk.blocks[0].attn
    with pytest.raises(ValueError, match="group qkv weight must be"):
        attn.set_group_weights(torch.zeros(2, 3, 3))


def test_invalid_thermal_pixels_do_not_contribute(info, text):
    model = make_micro(info, text).eval()
    randomize_lora(model)
    rgb, th = pair()
    valid = torch.ones(1, 1, 64, 96)
    valid[..., :, 48:] = 0
    th2 = th.clone()
    th2[..., :, 48:] = torch.randn(1, 1, 64, 48) * 5
    with torch.no_grad():
        a = model(rgb, th, valid)["logits"]
        b = model(rgb, th2, valid)["logits"]
        c = model(rgb, th2)["logits"]
        d = model(rgb, th)["logits"]
    assert torch.equal(a, b)
    assert (c - d).abs().max() > 1e-3  # without the mask those pixels do matter


def test_auxiliary_head_is_registered_trained_and_updated(info, text):
    model = make_micro(info, text).train()
    aux = {n: p for n, p in model.named_parameters() if n.startswith("aux_head.")}
    assert aux and all(p.requires_grad for p in aux.values())
    state_keys = set(model.state_dict())
    assert set(aux) <= state_keys
    assert any(k.startswith("aux_head.context.1.running_mean") for k in state_keys)
    before = {n: p.detach().clone() for n, p in aux.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randint(0, info.num_classes, (2, 16, 24))
    out = model(*pair(2))
    loss = torch.nn.functional.cross_entropy(out["s1"], target)
    loss.backward()
    for n, p in aux.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    opt.step()
    for n, p in aux.items():
        assert not torch.equal(before[n], p.detach()), n


def test_frozen_random_encoder_is_refused(info, text):
    with pytest.raises(ValueError, match="frozen random network"):
        make_micro(info, text, freeze=True)
    with pytest.raises(ValueError, match="decoder.freeze_transformer"):
        make_micro(info, text, freeze_transformer=True)


def test_official_layout_checkpoint_loads_through_remap(info, text, tmp_path):
    source = make_micro(info, text, seed=3)
    state = source.sam2_state_dict()
    qkv = state["image_encoder.trunk.blocks.0.attn.qkv.weight"]
    assert qkv.shape[0] == 3 * qkv.shape[1]  # fused layout, as in sam2.1_hiera_*.pt
    assert not any("lora" in k or ".q." in k for k in state)
    path = write_official(source, tmp_path / "sam2_micro.pt")

    loaded = make_micro(info, text, seed=7, freeze_transformer=True, checkpoint=str(path), freeze=True)
    target_state = loaded.state_dict()
    for name, value in source.state_dict().items():
        if name.startswith("image_encoder.") and ".lora_" not in name:
            assert torch.equal(value, target_state[name]), name
        if name.startswith("sam_head.mask_decoder.") and name[len("sam_head.mask_decoder.") :].startswith(
            DECODER_SHARED_PARTS
        ):
            assert torch.equal(value, target_state[name]), name
    assert torch.equal(
        source.sam_head.pe_layer.positional_encoding_gaussian_matrix,
        loaded.sam_head.pe_layer.positional_encoding_gaussian_matrix,
    )
    x = pair()[0]
    with torch.no_grad():
        a = source.image_encoder(x)["backbone_fpn"]
        b = loaded.image_encoder(x)["backbone_fpn"]
    for fa, fb in zip(a, b):
        assert torch.allclose(fa, fb, atol=1e-6)

    frozen = set(loaded.frozen_base_state_keys())
    assert "image_encoder.trunk.blocks.0.attn.q.base_layer.weight" in frozen
    assert "sam_head.mask_decoder.transformer.layers.0.mlp.layers.0.weight" in frozen
    assert not any(".lora_" in k for k in frozen)


#: with frozen base weights, what trains besides LoRA
TRAINABLE_ON_BASE_WEIGHTS = (
    "rectify.",
    "fuse.",
    "language.",
    "aux_head.",
    "sam_head.mask_decoder.mask_tokens.",
    "sam_head.mask_decoder.output_hypernetworks_mlps.",
    "sam_head.mask_decoder.output_upscaling.",
    "sam_head.mask_decoder.conv_s0.",
    "sam_head.mask_decoder.conv_s1.",
)


def test_only_intended_parameters_train_with_base_weights(info, text, tmp_path):
    path = write_official(make_micro(info, text, seed=3), tmp_path / "base.pt")
    model = make_micro(info, text, freeze_transformer=True, checkpoint=str(path), freeze=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    allowed_prefixes = TRAINABLE_ON_BASE_WEIGHTS
    for name in trainable:
        assert ".lora_" in name or name.startswith(allowed_prefixes), name
    lora = {n for n in trainable if ".lora_" in n}
    blocks = len(model.image_encoder.trunk.blocks)
    # A and B, for q and v, for two adapters, in every block
    assert len(lora) == blocks * 2 * 2 * 2
    assert all(".attn.q." in n or ".attn.v." in n for n in lora)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("image_encoder.trunk.blocks.0.attn.q.base_layer") for n in frozen)
    assert any(n.startswith("image_encoder.neck.") for n in frozen)
    assert any(n.startswith("sam_head.mask_decoder.transformer.") for n in frozen)
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < counts["lora"] < counts["trainable"] < counts["total"]

    # frozen base weights really stay put through a training step
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    out = model(*pair())
    (out["logits"].logsumexp(1).mean() + out["s1"].mean()).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(frozen_before[n], p.detach()), n


def test_checkpoint_of_other_encoder_size_is_refused(info, text, tmp_path):
    other = copy.deepcopy(resolve_model_config(MICRO))
    other["encoder"]["trunk"]["embed_dim"] = 24
    other["encoder"]["neck"]["backbone_channel_list"] = [192, 96, 48, 24]
    path = write_official(build_model(other, info, text), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit"):
        make_micro(info, text, checkpoint=str(path), freeze=True)


def test_real_sam2_1_hiera_tiny_layout_is_remapped(tmp_path):
    """The key layout of sam2.1_hiera_t (the sam2 package's own SAM2Base) loads into our modules."""
    import sam2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(os.path.join(sam2.__path__[0], "configs/sam2.1/sam2.1_hiera_t.yaml")).model
    node.image_encoder.neck.position_encoding.warmup_cache = False
    torch.manual_seed(0)
    official = instantiate(node, _recursive_=True)
    state = official.state_dict()
    parts = official_to_parts(state, source="SAM2Base(sam2.1_hiera_t)")

    encoder = build_image_encoder("hiera_tiny")
    result = encoder.load_state_dict(parts.image_encoder, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    head = SAM2MaskDecoderHead(256, num_classes=9)
    wanted = {k for k in head.mask_decoder.state_dict() if k.startswith(DECODER_SHARED_PARTS)}
    assert wanted == set(parts.mask_decoder)
    head.mask_decoder.load_state_dict(parts.mask_decoder, strict=False)
    assert parts.pe_gaussian.shape == head.pe_layer.positional_encoding_gaussian_matrix.shape
    assert parts.no_mask_embed.shape == head.no_mask_embed.weight.shape

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = encoder(x)["backbone_fpn"]
        theirs = official.image_encoder(x)["backbone_fpn"]
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)

    # the same file through the reader, as a user would pass sam2.1_hiera_tiny.pt
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("image_encoder.trunk.blocks.0")}}, path)
    assert "image_encoder.trunk.blocks.0.attn.qkv.weight" in read_official_state_dict(path)


def test_config_errors_name_the_problem(info, text):
    cfg = resolve_model_config(MICRO)
    bad = copy.deepcopy(cfg)
    bad["lora"]["rnak"] = 4
    with pytest.raises(ValueError, match="lora.rnak"):
        build_model(bad, info, text)
    bad = copy.deepcopy(cfg)
    bad["backend"] = "nonesuch"
    with pytest.raises(ValueError, match="unknown model backend 'nonesuch'"):
        build_model(bad, info, text)
    bad = copy.deepcopy(cfg)
    bad["input_size"] = [100, 128]
    with pytest.raises(ValueError, match="multiples of 32"):
        resolve_model_config(bad)
    with pytest.raises(ValueError, match="text_embeddings must be"):
        build_model(cfg, info, torch.zeros(info.num_classes + 1, 384))


def test_tiny_config_documents_production_defaults():
    cfg = resolve_model_config("models/sartm_tiny.yaml")
    assert cfg["input_size"] == [480, 640]
    assert cfg["encoder"]["sam2_config"] == "hiera_tiny" and cfg["encoder"]["freeze"] is True
    assert cfg["lora"]["rank"] == 16 and cfg["lora"]["targets"] == ["q", "v"]
    with pytest.raises(ValueError, match="encoder.checkpoint is not set"):
        build_model(cfg, load_dataset_info("mfnet"))


def test_model_is_a_sartm_and_counts_params(info, text):
    model = make_micro(info, text)
    assert isinstance(model, SARTM)
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    many = DatasetInfo.from_dict({"name": "x", "classes": [{"name": f"c{i}", "color": [0, 0, 0]} for i in range(3)]})
    small = build_model(micro_cfg(), many, torch.zeros(3, 384))
    assert small.parameter_counts()["total"] < counts["total"]


def test_flop_count_includes_attention(info, text):
    """FlopCounterMode has no formula for CPU SDPA; the bench counts attention as explicit matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    from rgbt_seg_ros.tools.bench import count_flops

    model = make_micro(info, text).eval()
    rgb, th = pair()
    plain = FlopCounterMode(display=False)
    with torch.inference_mode(), plain:
        model(rgb, th)
    counted = count_flops(model, rgb, th)
    # attention calls: every Hiera block (x2 modalities) and the two-way transformer
    assert counted["total"] > plain.get_total_flops()
    assert counted["per_module"]["image_encoder"] > counted["per_module"]["aux_head"] > 0
    assert sum(counted["per_module"].values()) == counted["total"]


def test_bench_model_reports_the_figures(tmp_path):
    from rgbt_seg_ros.tools.bench import bench_model, markdown

    result = bench_model(MICRO, size=(64, 96), repeats=1)
    assert result["params_total"] >= result["params_trainable"] > result["params_lora"] > 0
    assert result["gflop_per_pair"] > 0 and result["forward_ms_median"] > 0
    assert 0 < result["ratio_to_matmul"] and result["matmul_gflops"] > 0
    table = markdown(result)
    assert "GFLOP per RGB-T pair" in table and "ratio to matmul" in table
    assert result["forward_ms_two_pass"] > 0 and result["batched_vs_two_pass"] > 0
    assert "batched / two-pass time" in table


def test_without_the_language_module_no_loss_term_trains_against_a_missing_text_teacher(info, text):
    """Language off: the model has no text teacher, so L_se is skipped (with a warning), never
    computed against the all-zero placeholder buffer; L_cr keeps its teacher (the other modality)."""
    import warnings

    from rgbt_seg_ros.training.losses import SartmLoss

    cfg = micro_cfg()
    cfg["language"]["enabled"] = False
    torch.manual_seed(0)
    model = build_model(cfg, info, None)
    rgb, th = pair(b=2, h=64, w=96)
    out = model(rgb, th)
    assert out["text_embeddings"] is None
    labels = torch.randint(0, info.num_classes, (2, 64, 96), generator=torch.Generator().manual_seed(3))
    loss = SartmLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total, parts = loss(out, labels)
    assert "l_se" not in parts
    assert parts["l_cr"] > 0  # cross-modal: RGB and thermal prototypes of the same class
    assert any("L_se is skipped" in str(w.message) for w in caught)
    total.backward()
    # With language on, the same model kind computes L_se against the class-name embeddings.
    model_on = make_micro(info, text)
    _, parts_on = SartmLoss()(model_on(rgb, th), labels)
    assert parts_on["l_se"] > 0


# ---------------------------------------------------------------- the shared backend contract


def _sartm_freeze(cfg: dict, path: str) -> None:
    cfg["encoder"].update(checkpoint=path, freeze=True)
    cfg["decoder"]["freeze_transformer"] = True


SARTM_CASE = BackendCase(
    name="sartm",
    config="models/sartm_micro.yaml",
    trainable_prefixes=TRAINABLE_ON_BASE_WEIGHTS,
    frozen_prefixes=("image_encoder.trunk.", "image_encoder.neck.", "sam_head.mask_decoder.transformer."),
    thermal_param="image_encoder.trunk.blocks.0.attn.q.lora_A.thermal.weight",
    freeze_with_base=_sartm_freeze,
    # LoRA B and the fusion's zero-init gates (FRM, FFM, language weighting; fusion.identity_init)
    randomize=lambda model: randomize_named(model, (".lora_B.", ".gate")),
    tiny_config="models/sartm_tiny.yaml",
    identity_kind="decoder",
    identity=decoder_inputs,
)


class TestSartmContract(BackendContract):
    case = SARTM_CASE
