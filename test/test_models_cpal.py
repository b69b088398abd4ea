"""CPAL backend: zero-init MCP = the plain trunk, prompt directions, last-stage LoRA, GPM, UPerHead, config errors."""

import copy

import pytest
import torch
from backend_contract import BackendCase, BackendContract, randomize_named

from rgbt_seg_ros.models import build_model, resolve_model_config
from rgbt_seg_ros.models.classes import load_dataset_info
from rgbt_seg_ros.models.cpal import CPAL
from rgbt_seg_ros.models.cpal_blocks import (
    GatedPerceptionModule,
    MultiModalCrossPrompter,
    UPerHead,
    dual_stream_block,
)
from rgbt_seg_ros.models.lora import activate_adapter

MICRO = "models/cpal_micro.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny tensors


def make(info, seed=0, **sections):
    cfg = resolve_model_config(MICRO)
    for key, value in sections.items():
        cfg[key].update(value)
    torch.manual_seed(seed)
    return build_model(cfg, info)


def pair(b=1, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randn(b, 1, h, w, generator=g)


def test_zero_init_streams_equal_the_plain_frozen_trunk(info):
    model = make(info).eval()
    assert isinstance(model, CPAL)
    rgb, th = pair(2)
    with torch.no_grad():
        streams = model.streams(rgb, th.expand(-1, 3, -1, -1))
        activate_adapter(model.trunk, "rgb")
        plain_rgb = model.trunk(rgb)
        plain_th = model.trunk(th.expand(-1, 3, -1, -1))
    assert len(streams) == 4
    for (s_rgb, s_th), p_rgb, p_th in zip(streams, plain_rgb, plain_th):
        # equal up to float summation order: the streams run both modalities as one batch, and a CPU's
        # kernels (AVX-512 oneDNN here) may sum in another order at another batch size
        torch.testing.assert_close(s_rgb, p_rgb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s_th, p_th, rtol=1e-5, atol=1e-5)


def test_every_block_has_an_mcp_with_the_right_shapes(info):
    model = make(info)
    trunk = model.trunk
    assert sorted(int(k) for k in model.mcp) == list(range(len(trunk.blocks)))
    x = torch.randn(1, 16, 24, trunk.blocks[0].dim)
    for i, block in enumerate(trunk.blocks):
        mcp = model.mcp[str(i)]
        up = mcp.attn_prompt.from_rgb.up
        assert torch.count_nonzero(up.weight) == 0 and torch.count_nonzero(up.bias) == 0
        with torch.no_grad():
            y_rgb, y_th = dual_stream_block(block, mcp, x, x)
            ref = block(x)
        assert y_rgb.shape == ref.shape == y_th.shape  # stride-2 mid projection at stage changes
        x = ref


def test_prompts_cross_from_one_stream_to_the_other():
    """P_RGB (from the RGB stream) lands in the thermal stream only, and vice versa."""
    from sam2.modeling.backbones.hieradet import MultiScaleBlock

    torch.manual_seed(0)
    block = MultiScaleBlock(16, 32, num_heads=2, q_stride=(2, 2), window_size=4).eval()
    mcp = MultiModalCrossPrompter(16, 32, hidden=8, groups=4, stride=2)
    with torch.no_grad():
        for branch in (mcp.attn_prompt.from_rgb, mcp.mlp_prompt.from_rgb):
            branch.up.weight.normal_(0, 0.5)
        x_rgb, x_th = torch.randn(1, 8, 8, 16), torch.randn(1, 8, 8, 16)
        y_rgb, y_th = dual_stream_block(block, mcp, x_rgb, x_th)
        assert torch.equal(y_rgb, block(x_rgb))  # the thermal->RGB branch is still zero
        assert not torch.allclose(y_th, block(x_th))
        # and the RGB prompt depends on the RGB tokens
        _, y_th2 = dual_stream_block(block, mcp, x_rgb * 2, x_th)
        assert not torch.allclose(y_th, y_th2)


def test_lora_only_in_the_last_stage_one_adapter_per_stream(info):
    model = make(info)
    last = {i for i, s in enumerate(model.stage_of_block) if s == 3}
    assert model.lora_blocks == last == {4}
    lora = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert lora and all(n.startswith("trunk.blocks.4.attn.") for n in lora)
    assert {n.split(".")[4] for n in lora} == {"q", "k"}  # the configured targets
    assert {n.split(".")[6] for n in lora} == {"rgb", "thermal"}

    # each adapter acts only on its own stream
    model.eval()
    rgb, th = pair()
    with torch.no_grad():
        before = model.streams(rgb, th.expand(-1, 3, -1, -1))[-1]
        for name, p in model.named_parameters():
            if ".lora_B.rgb." in name:
                p.normal_(0, 0.5)
        after = model.streams(rgb, th.expand(-1, 3, -1, -1))[-1]
    assert not torch.allclose(before[0], after[0])
    assert torch.equal(before[1], after[1])


def test_lora_stages_and_mcp_stages_are_configurable(info):
    model = make(info, lora={"stages": [3, 4]}, mcp={"stages": [4]})
    assert model.lora_blocks == {2, 3, 4}
    assert sorted(model.mcp) == ["4"]
    no_lora = make(info, lora={"stages": []})
    assert not no_lora.lora_blocks and no_lora.parameter_counts()["lora"] == 0
    with torch.no_grad():
        assert no_lora.eval()(*pair())["logits"].shape[1] == info.num_classes


def test_gpm_forget_gate_and_mask():
    torch.manual_seed(0)
    gpm = GatedPerceptionModule(16, 8, heads=2, kv_pool=2).eval()
    t_rgb, t_th = torch.randn(2, 16, 6, 10), torch.randn(2, 16, 6, 10)
    with torch.no_grad():
        out = gpm(t_rgb, t_th)
        assert out.shape == t_rgb.shape
        assert not torch.allclose(out, gpm(t_rgb, t_th * 3))  # thermal enters through the perception matrix
        zero = torch.zeros(2, 1, 6, 10)
        assert torch.equal(gpm(t_rgb, t_th, zero), gpm(t_rgb, torch.randn_like(t_th), zero))
        # eq. 17: with the perception matrix's output zeroed, V_m = V_RGB
        gpm.attn_out.weight.zero_()
        gpm.attn_out.bias.zero_()
        v_rgb = gpm.lin_rgb(gpm.conv_rgb(t_rgb).permute(0, 2, 3, 1))
        assert torch.allclose(gpm(t_rgb, t_th), gpm.out(v_rgb.permute(0, 3, 1, 2)), atol=1e-6)


def test_uper_head_shapes_and_batch_one_training():
    head = UPerHead([16, 32, 64, 128], 16, 5, pool_scales=(1, 2, 3, 6)).train()
    feats = [torch.randn(1, c, 24 // 2**i, 32 // 2**i) for i, c in enumerate([16, 32, 64, 128])]
    out = head(feats)
    assert out.shape == (1, 5, 24, 32)
    out.mean().backward()  # batch 1 in training mode: the pooling branches carry no BatchNorm


def test_config_errors_name_the_problem(info):
    cfg = resolve_model_config(MICRO)
    for section, key, value, match in (
        ("lora", "stages", [5], "lora.stages"),
        ("mcp", "stages", [0], "mcp.stages"),
        ("gpm", "kv_pool", [1, 1], "gpm.kv_pool"),
        ("encoder", "freeze", True, "frozen random network"),
    ):
        bad = copy.deepcopy(cfg)
        bad[section][key] = value
        with pytest.raises(ValueError, match=match):
            build_model(bad, info)
    bad = copy.deepcopy(cfg)
    bad["gpm"]["typo"] = 1
    with pytest.raises(ValueError, match="gpm.typo"):
        build_model(bad, info)


def test_base_weights_load_from_a_full_official_file(info, tmp_path):
    """A full SAM2 file (trunk + neck + decoder, as sam2.1_hiera_*.pt) feeds CPAL's trunk."""
    sartm_cfg = resolve_model_config("models/sartm_micro.yaml")
    torch.manual_seed(3)
    source = build_model(sartm_cfg, info, torch.zeros(info.num_classes, 384))
    state = source.sam2_state_dict()
    assert any(k.startswith("sam_mask_decoder.") for k in state)
    path = tmp_path / "full.pt"
    torch.save({"model": state}, path)
    model = make(info, seed=9, encoder={"checkpoint": str(path), "freeze": True}).eval()
    x = pair()[0]
    with torch.no_grad():
        activate_adapter(source.image_encoder.trunk, "rgb")
        ref = source.image_encoder.trunk(x)
        ours = model.trunk(x)
    for a, b in zip(ref, ours):
        assert torch.allclose(a, b, atol=1e-6)
    exported = model.sam2_state_dict()
    assert set(exported) == {k for k in state if k.startswith("image_encoder.trunk.")}
    assert all(torch.equal(exported[k], state[k]) for k in exported)

    other = resolve_model_config(MICRO)
    other["encoder"]["trunk"]["embed_dim"] = 24
    with pytest.raises(ValueError, match="does not fit"):
        build_model({**other, "encoder": {**other["encoder"], "checkpoint": str(path), "freeze": True}}, info)


def test_tiny_config_documents_the_production_setup():
    cfg = resolve_model_config("models/cpal_tiny.yaml")
    assert cfg["backend"] == "cpal" and cfg["input_size"] == [480, 640]
    assert cfg["encoder"]["sam2_config"] == "hiera_tiny" and cfg["encoder"]["freeze"] is True
    assert cfg["lora"]["stages"] == [4] and cfg["mcp"]["stages"] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="encoder.checkpoint is not set"):
        build_model(cfg, load_dataset_info("mfnet"))


# ---------------------------------------------------------------- the shared backend contract


def _encoder_freeze(cfg: dict, path: str) -> None:
    cfg["encoder"].update(checkpoint=path, freeze=True)


def _rgb_stream(model, rgb, thermal):
    """The RGB stream's four stage maps, the trunk features CPAL's GPMs fuse (``CPAL.streams``, which
    ``forward`` runs)."""
    with torch.no_grad():
        stages = model.streams(rgb, thermal.expand(-1, 3, -1, -1))
    return {f"stage{i}": t_rgb for i, (t_rgb, _) in enumerate(stages, start=1)}


CPAL_CASE = BackendCase(
    name="cpal",
    config="models/cpal_micro.yaml",
    trainable_prefixes=("mcp.", "gpm.", "head."),
    frozen_prefixes=("trunk.patch_embed.", "trunk.blocks.0.", "trunk.blocks.4.attn.q.base_layer."),
    thermal_param="mcp.0.attn_prompt.from_thermal.down.weight",
    freeze_with_base=_encoder_freeze,
    randomize=lambda model: randomize_named(model, (".lora_B.", ".up.")),
    tiny_config="models/cpal_tiny.yaml",
    identity_kind="trunk",
    identity=_rgb_stream,
)


class TestCpalContract(BackendContract):
    case = CPAL_CASE
