"""SegRGB-X backend: gated prompts in windowed attention, identity at init, LoRA on the trunk, DSRM, MA-CLIP (the
Hiera stand-in and a real CLIP through transformers), linear and cosine heads, class sets, ablations, and its case of
the shared backend contract (at the end)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from backend_contract import BackendCase, BackendContract, randomize_named

from rgbt_seg_ros.models import build_model, resolve_model_config
from rgbt_seg_ros.models.checkpoint import load_checkpoint, save_checkpoint
from rgbt_seg_ros.models.classes import load_dataset_info
from rgbt_seg_ros.models.segrgbx import SegRGBX
from rgbt_seg_ros.models.segrgbx_blocks import DSRM, prompted_block
from rgbt_seg_ros.training.ma_clip import caption, contrastive_loss

MICRO = "models/segrgbx_micro.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny tensors


def make(info, seed=0, text=None, **sections):
    cfg = resolve_model_config(MICRO)
    for key, value in sections.items():
        if isinstance(cfg.get(key), dict) and isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    torch.manual_seed(seed)
    return build_model(cfg, info, text)


def pair(b=1, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randn(b, 1, h, w, generator=g)


def unit(n, d=384, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# --------------------------------------------------------------------------- III-C prompts in attention


def _block(dim, dim_out, heads, seed, **kw):
    from sam2.modeling.backbones.hieradet import MultiScaleBlock

    from rgbt_seg_ros.models.sam2_encoder import SplitQKVAttention

    torch.manual_seed(seed)
    block = MultiScaleBlock(dim, dim_out, num_heads=heads, **kw).eval()
    block.attn = SplitQKVAttention.from_fused(block.attn)
    return block


def test_prompts_enter_a_block_through_a_zero_gate_per_head():
    """Written out by hand for a global-attention block: the window attention plus, per head, tanh(gate) times
    a softmax over the prompt keys of its own (LLaMA-Adapter's zero-init attention); O_M is not computed. At
    gate 0 the block is exactly the plain block, and the gate has a gradient."""
    block = _block(16, 16, 2, seed=0, window_size=0)
    x, m = torch.randn(2, 4, 6, 16), torch.randn(2, 3, 16)
    gate = torch.tensor([0.7, -0.3])
    with torch.no_grad():
        got = prompted_block(block, x, m, gate)
        a = block.attn
        e, p = block.norm1(x).reshape(2, 24, 16), block.norm1(m)

        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], 2, 8).transpose(1, 2)

        q, k, v, k_m, v_m = heads(a.q(e)), heads(a.k(e)), heads(a.v(e)), heads(a.k(p)), heads(a.v(p))
        o_e = ((q @ k.transpose(-2, -1)) / 8**0.5).softmax(-1) @ v
        o_m = ((q @ k_m.transpose(-2, -1)) / 8**0.5).softmax(-1) @ v_m
        o = o_e + torch.tanh(gate).view(1, 2, 1, 1) * o_m
        t = x + a.proj(o.transpose(1, 2).reshape(2, 4, 6, 16))
        want = t + block.mlp(block.norm2(t))
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, block(x), atol=1e-4)  # the prompts change the output
        assert torch.equal(prompted_block(block, x, m, torch.zeros(2)), block(x))  # exactly the block at gate 0
    zero = torch.zeros(2, requires_grad=True)
    prompted_block(block, x, m, zero).square().sum().backward()
    assert zero.grad is not None and (zero.grad.abs() > 0).all()


def test_gated_prompts_reach_every_window_and_stay_in_their_sample():
    block = _block(16, 32, 2, seed=1, q_stride=(2, 2), window_size=4)
    x = torch.randn(2, 8, 8, 16)
    m1, m2 = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    m2[1] = m1[1]  # sample 1's prompts unchanged
    gate = torch.full((2,), 0.5)
    with torch.no_grad():
        a, b = prompted_block(block, x, m1, gate), prompted_block(block, x, m2, gate)
        assert torch.equal(prompted_block(block, x, m1, torch.zeros(2)), block(x))  # q pooling and windows alike
    assert a.shape == (2, 4, 4, 32)
    changed = (a[0] - b[0]).abs().amax(dim=-1) > 1e-6  # (4, 4) after q pooling: 4 windows of 2x2
    assert changed.all(), "a window did not see sample 0's prompts"
    assert torch.equal(a[1], b[1]), "prompts leaked across samples"


def test_plain_attention_is_unchanged_by_the_prompt_path():
    """SARTM and CPAL call SplitQKVAttention without prompts: the same numbers as sam2's fused attention."""
    from sam2.modeling.backbones.hieradet import MultiScaleBlock

    torch.manual_seed(2)
    fused = MultiScaleBlock(16, 32, num_heads=2, q_stride=(2, 2), window_size=4).eval()
    split = copy.deepcopy(fused)
    from rgbt_seg_ros.models.sam2_encoder import SplitQKVAttention

    split.attn = SplitQKVAttention.from_fused(split.attn)
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        assert torch.allclose(split(x), fused(x), atol=1e-6)


def test_stage_groups_cover_every_block_and_prompt_widths_match(info):
    model = make(info)
    assert sorted(set(model.group_of_block)) == [0, 1, 2, 3]
    for i, block in enumerate(model.trunk.blocks):
        assert model.dims[model.group_of_block[i]] == block.dim
        assert model.prompt_gates[i].shape == (block.attn.num_heads,) and not model.prompt_gates[i].any()
    prompts = model._prompts(torch.randn(4, 384), 2, torch.float32)
    n = model.control[0].tokens + model.aligned_prompts["rgb"][0].shape[0]
    assert [p.shape for p in prompts] == [(4, n, d) for d in model.dims]


def test_rgb_dominant_gives_both_branches_the_rgb_guidance(info):
    model = make(info)
    s = torch.randn(4, 384)
    s_other = s.clone()
    s_other[2:] = torch.randn(2, 384)  # only S^m changes
    with torch.no_grad():
        a, b = model._prompts(s, 2, torch.float32), model._prompts(s_other, 2, torch.float32)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    aligned = make(info, prompts={"pairing": "aligned"})
    with torch.no_grad():
        a, b = aligned._prompts(s, 2, torch.float32), aligned._prompts(s_other, 2, torch.float32)
    assert torch.equal(a[0][:2], b[0][:2]) and not torch.equal(a[0][2:], b[0][2:])


# --------------------------------------------------------------------------- identity at init


def test_gated_frm_is_the_identity_until_its_gate_moves():
    from rgbt_seg_ros.models.segrgbx_blocks import GatedRectify

    torch.manual_seed(0)
    frm = GatedRectify(8, reduction=2)
    x_r, x_m = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    valid = torch.ones(2, 1, 5, 6)
    valid[..., 3:] = 0
    r, m = frm(x_r, x_m, valid)
    assert torch.equal(r, x_r) and torch.equal(m, x_m)
    r.square().sum().backward()
    assert frm.gate.grad[0].abs().sum() > 0  # the cross term into RGB: a gradient at step 0
    with torch.no_grad():
        frm.gate.fill_(0.5)
        r1, _ = frm(x_r, x_m, valid)
        x_m2 = x_m.clone()
        x_m2[..., 3:] = 7.0  # only where thermal is invalid
        r2, _ = frm(x_r, x_m2, valid)
        r3, _ = frm(x_r, x_m * 2, valid)
    assert not torch.equal(r1, x_r) and torch.equal(r1, r2) and not torch.allclose(r1, r3)


def _moved(model):
    """What training does to the zero-initialised parts (the contract case's randomize)."""
    randomize_named(model, ("lora_B", "dsrm.out.", "prompt_gates.", ".gate"))


def test_rgb_stream_is_the_trunk_at_init_on_base_weights(info, tmp_path):
    """On base weights, with every gate, LoRA B and the DSRM output at their initial zero, the RGB maps that
    forward fuses are a plain Hiera's stage outputs for the RGB image, and thermal changes nothing in them;
    once those parts move, thermal does (micro model; the contract checks it on sam2's own Hiera-tiny)."""
    from rgbt_seg_ros.models.cpal import CPAL, build_hiera_trunk

    torch.save({"model": make(info, seed=3).sam2_state_dict()}, tmp_path / "base.pt")
    model = make(info, seed=1, encoder={"checkpoint": str(tmp_path / "base.pt"), "freeze": True}).eval()
    cfg = resolve_model_config(MICRO)
    plain = build_hiera_trunk(cfg["encoder"]["sam2_config"], cfg["encoder"]["trunk"])
    CPAL._load_trunk(plain, tmp_path / "base.pt")
    rgb, th = pair(2)
    with torch.no_grad():
        want = plain(rgb)
        got = model.stream_features(rgb, th)
        other = model.stream_features(rgb, th.flip(-1) * 3)
    assert len(got) == 4
    for (x_r, _), (o_r, _), w in zip(got, other, want):
        torch.testing.assert_close(x_r, w, atol=1e-5, rtol=1e-5)
        assert torch.equal(x_r, o_r)
    _moved(model)
    with torch.no_grad():
        got = model.stream_features(rgb, th)
        other = model.stream_features(rgb, th.flip(-1) * 3)
    assert max((a - b).abs().max().item() for (a, _), (b, _) in zip(got, other)) > 1e-4


def test_forward_fuses_the_stream_features(info):
    """forward's fused maps are FFM of stream_features' pairs: the identity check sees forward's own path."""
    model = make(info).eval()
    _moved(model)
    rgb, th = pair(2)
    seen = []
    hooks = [ffm.register_forward_hook(lambda mod, args, out: seen.append(args[:2])) for ffm in model.ffm]
    with torch.no_grad():
        model(rgb, th)
        stages = model.stream_features(rgb, th)
    for h in hooks:
        h.remove()
    assert len(seen) == 4
    for (a_r, a_m), (b_r, b_m) in zip(seen, stages):
        assert torch.equal(a_r, b_r) and torch.equal(a_m, b_m)


# --------------------------------------------------------------------------- LoRA on the trunk


def test_lora_on_every_backbone_block_shared_by_both_streams(info, tmp_path):
    torch.save({"model": make(info, seed=3).sam2_state_dict()}, tmp_path / "base.pt")
    model = make(info, encoder={"checkpoint": str(tmp_path / "base.pt"), "freeze": True})
    for block in model.trunk.blocks:
        for name in ("q", "v"):
            assert list(getattr(block.attn, name).lora_A) == ["backbone"], name  # one adapter, both modalities
        assert not hasattr(block.attn.k, "lora_A")
    trainable = [n for n, p in model.trunk.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    rank = resolve_model_config(MICRO)["lora"]["rank"]
    expected = sum(2 * rank * (b.dim + b.dim_out) for b in model.trunk.blocks)  # A and B of q and v
    assert sum(model.trunk.get_parameter(n).numel() for n in trainable) == expected
    rgb, th = pair()
    with torch.no_grad():
        before = model(rgb, th)["logits"]
        randomize_named(model, ("trunk.blocks.2.attn.v.lora_B",))
        assert not torch.allclose(model(rgb, th)["logits"], before)
    assert not any(".lora_" in k for k in model.frozen_base_state_keys())
    no_lora = make(info, lora={"rank": 0})
    assert not any(".lora_" in n for n, _ in no_lora.trunk.named_parameters())
    with torch.no_grad():
        assert no_lora(rgb, th)["logits"].shape == before.shape


def test_reference_forward_is_the_base_trunk_without_lora(info, tmp_path):
    from rgbt_seg_ros.models.cpal import CPAL, build_hiera_trunk

    torch.save({"model": make(info, seed=3).sam2_state_dict()}, tmp_path / "base.pt")
    model = make(info, encoder={"checkpoint": str(tmp_path / "base.pt"), "freeze": True}).eval()
    randomize_named(model, ("lora_B",))
    cfg = resolve_model_config(MICRO)
    plain = build_hiera_trunk(cfg["encoder"]["sam2_config"], cfg["encoder"]["trunk"])
    CPAL._load_trunk(plain, tmp_path / "base.pt")
    rgb, th = pair()
    with torch.no_grad():
        ref = model.reference_forward(rgb, th)
        want = plain(torch.cat([rgb, th.expand(-1, 3, -1, -1)]))[-1].permute(0, 2, 3, 1)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)


def test_bench_model_times_the_forward_against_the_bare_encoder():
    """``rgbt-seg bench model``'s path on the micro config: FLOPs counted under inference mode (the gates are
    parameters handed to the attention), forward timed against reference_forward."""
    from rgbt_seg_ros.tools.bench import bench_model

    result = bench_model(MICRO, size=(64, 96), repeats=1)
    ref = result["reference"]
    assert ref["gflop_per_pair"] > 0 and result["gflop_per_pair"] > ref["gflop_per_pair"]
    assert ref["ratio"] > 0 and set(result["gflop_per_module"]) >= {"ma_clip", "dsrm", "ffm", "frm", "head"}


# --------------------------------------------------------------------------- III-D DSRM


def test_dsrm_starts_as_identity_and_uses_the_ma_clip_map():
    torch.manual_seed(0)
    dsrm = DSRM(32, 384, num_prompts=4, prompt_size=2, heads=2)
    x, s1, s2 = torch.randn(2, 3, 5, 32), torch.randn(2, 2, 2, 384), torch.randn(2, 2, 2, 384)
    with torch.no_grad():
        assert torch.equal(dsrm(x, s1), x)  # zero-initialised output projection
        chi = dsrm.last_indicator
        assert chi.shape == (2, 4) and torch.allclose(chi.sum(-1), torch.ones(2))
        dsrm.out.weight.normal_(0, 0.1)
        assert not torch.allclose(dsrm(x, s1), dsrm(x, s2))  # spatial queries come from S
        y = dsrm(x, None)  # the ablation without MA-CLIP: queries from F_c
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_dsrm_runs_once_per_modality_at_the_end_of_stage_4(info):
    """Fig. 2 and 4: one DSRM (shared weights) over (F_4^r, S^r) and (F_4^m, S^m), once, on stage 4's output."""
    model = make(info).eval()
    _moved(model)
    calls = []
    hook = model.dsrm.register_forward_hook(lambda mod, args, out: calls.append((args[0].shape, args[1], out)))
    rgb, th = pair(2)
    with torch.no_grad():
        guide = model.guidance(rgb, th.expand(-1, 3, -1, -1))
        stages = model.stream_features(rgb, th)
    hook.remove()
    assert len(calls) == 1
    shape, s_map, out = calls[0]
    h, w = stages[-1][0].shape[-2:]
    assert shape == (4, h, w, model.dims[-1])  # [F^r; F^m] of the last stage
    assert torch.equal(s_map, guide[0])  # the "Aligned" pairing: S^r with F^r, S^m with F^m
    with torch.no_grad():
        frm_in = out.permute(0, 3, 1, 2).chunk(2)
        assert torch.equal(model.frm[-1](*frm_in)[0], stages[-1][0])  # stage 4's FRM reads the refined maps


# --------------------------------------------------------------------------- MA-CLIP


def test_ma_clip_lora_pool_and_what_pretraining_trains(info, tmp_path):
    model = make(info).eval()
    rgb, th = pair(2)
    x3 = th.expand(-1, 3, -1, -1)
    with torch.no_grad():
        s_map, s = model.ma_clip(rgb, x3, "thermal")
    assert s_map.shape[0] == 4 and s.shape == (4, 384)
    assert torch.allclose(s.norm(dim=-1), torch.ones(4), atol=1e-5)
    randomize_named(model, ("ma_clip.trunk.blocks.1.attn.q.lora_B",))
    with torch.no_grad():
        assert not torch.allclose(model.ma_clip(rgb, x3, "thermal")[1], s)
    with pytest.raises(ValueError, match="no LoRA for modality 'depth'"):
        model.ma_clip(rgb, x3, "depth")
    # random init: pretraining may train the trunk; on base weights only LoRA, norm and projection
    assert any(p is model.ma_clip.trunk.blocks[0].mlp.layers[0].weight for p in model.ma_clip_parameters())
    source = make(info, seed=3)
    torch.save({"model": source.sam2_state_dict()}, tmp_path / "base.pt")
    based = make(info, encoder={"checkpoint": str(tmp_path / "base.pt"), "freeze": True})
    names = {n for n, p in based.ma_clip.named_parameters() if any(p is q for q in based.ma_clip_parameters())}
    assert names and all(".lora_" in n or not n.startswith("trunk.") for n in names)
    assert not any(p.requires_grad for p in based.ma_clip.parameters())  # frozen outside its stage


def test_captions_count_regions_and_name_the_condition():
    names = ("background", "road", "building", "vegetation", "person", "car", "traffic cone", "traffic sign")
    labels = np.zeros((60, 80), np.int64)
    labels[40:, :] = 1
    labels[5:15, 5:10] = 4
    labels[5:15, 30:35] = 4
    labels[20:30, 50:70] = 5
    text = caption(labels, names, "night")
    assert text == "a scene at night with a road, two people and a car"
    assert caption(np.zeros((8, 8), np.int64), names, "") == "a scene with nothing labelled"


def test_contrastive_loss_prefers_matching_pairs_and_tolerates_equal_captions():
    t = unit(3)
    good, _ = contrastive_loss(torch.cat([t, t]), t, ["a", "b", "c"], 0.07)
    bad, acc = contrastive_loss(torch.cat([t.roll(1, 0), t.roll(1, 0)]), t, ["a", "b", "c"], 0.07)
    assert good < bad and acc == 0.0
    # images 0 and 1 swapped: a mismatch, unless their captions are equal (then either text is a match)
    swapped = torch.cat([t[[1, 0, 2]], t[[1, 0, 2]]])
    assert contrastive_loss(swapped, t, ["x", "y", "c"], 0.07)[1] == pytest.approx(1 / 3)
    assert contrastive_loss(swapped, t, ["x", "x", "c"], 0.07)[1] == 1.0


def stage_run_config(max_steps: int, pretrain_steps: int) -> dict:
    """A tiny synthetic train config whose run starts with a short MA-CLIP stage."""
    return {
        "dataset": "synthetic",
        "dataset_options": {"count": 8, "size": [64, 96]},
        "val_split": None,
        "max_steps": max_steps,
        "batch_size": 2,
        "pretrain_steps": pretrain_steps,
        "log_every": 1,
        "progress": False,
        "tensorboard": False,
        "model": {"input_size": [64, 96], "ma_clip": {"pretrain": {"batch_size": 4}}},
    }


def test_trainer_runs_the_ma_clip_stage_first_and_freezes_it_again(tmp_path):
    import json

    from rgbt_seg_ros.training.trainer import Trainer

    cfg = stage_run_config(max_steps=1, pretrain_steps=3)
    info = load_dataset_info("synthetic")
    tr = Trainer(MICRO, cfg, tmp_path / "run", text_embeddings=unit(info.num_classes))
    before = {n: p.detach().clone() for n, p in tr.model.ma_clip.named_parameters()}
    tr.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows] == ["pretrain"] * 3 + ["train"]
    assert all(np.isfinite(r["contrastive"]) for r in rows[:3])
    after = dict(tr.model.ma_clip.named_parameters())
    assert not torch.equal(before["proj.weight"], after["proj.weight"].detach())
    assert not any(p.requires_grad for p in tr.model.ma_clip.parameters())
    assert tr.train_state()["pretrained"] is True


# --------------------------------------------------------------------------- class sets


def test_one_model_holds_several_class_sets(info, tmp_path):
    mfnet = load_dataset_info("mfnet")
    text = {"synthetic": unit(info.num_classes, seed=1), "mfnet": unit(mfnet.num_classes, seed=2)}
    model = make(info, text=text, class_sets={"mfnet": mfnet.to_dict()}).eval()
    assert model.class_set_names == ("synthetic", "mfnet")
    rgb, th = pair()
    with torch.no_grad():
        a = model(rgb, th)["logits"]
        model.select_class_set("mfnet")
        b = model(rgb, th)["logits"]
    assert a.shape[1] == info.num_classes and b.shape[1] == mfnet.num_classes
    assert model.class_names == mfnet.class_names
    with pytest.raises(ValueError, match="unknown class set 'fmb'; this model has synthetic, mfnet"):
        model.select_class_set("fmb")
    with pytest.raises(ValueError, match="text_embeddings of class set 'mfnet' must be"):
        make(info, text={"mfnet": unit(3)}, class_sets={"mfnet": mfnet.to_dict()})
    # the sets and their embeddings travel in the checkpoint
    model.select_class_set("synthetic")
    ckpt = save_checkpoint(model, copy.deepcopy(model_cfg_of(info, mfnet)), info, tmp_path / "ckpt")
    loaded, cfg, _ = load_checkpoint(ckpt)
    assert loaded.class_set_names == ("synthetic", "mfnet")
    assert torch.equal(loaded.class_text("mfnet"), text["mfnet"])
    loaded.select_class_set("mfnet")
    with torch.no_grad():
        assert torch.equal(loaded(rgb, th)["logits"], b)


def model_cfg_of(info, mfnet):
    cfg = resolve_model_config(MICRO)
    cfg["class_sets"] = {"mfnet": mfnet.to_dict()}
    return cfg


def test_one_label_space_gets_a_linear_classifier(info, tmp_path):
    """head.classifier auto: SegFormer's linear classifier for one label space; the cosine-to-class-name head
    where class_sets need it (or when asked for)."""
    model = make(info).eval()
    assert model.classifier == "linear" and model.head.logit_scale is None
    assert model.head.embed.out_channels == info.num_classes
    rgb, th = pair()
    with torch.no_grad():
        a = model(rgb, th)["logits"]
        model.set_text_embeddings(unit(info.num_classes, seed=5))  # the linear head does not read them
        assert torch.equal(model(rgb, th)["logits"], a)
    cosine = make(info, text=unit(info.num_classes), head={"classifier": "cosine"}).eval()
    assert cosine.head.embed.out_channels == 384 and cosine.head.logit_scale is not None
    with torch.no_grad():
        b = cosine(rgb, th)["logits"]
        cosine.set_text_embeddings(unit(info.num_classes, seed=5))
        assert not torch.equal(cosine(rgb, th)["logits"], b)
    mfnet = load_dataset_info("mfnet")
    assert make(info, class_sets={"mfnet": mfnet.to_dict()}).classifier == "cosine"
    with pytest.raises(ValueError, match="head.classifier 'linear' scores one label space, but class_sets"):
        make(info, head={"classifier": "linear"}, class_sets={"mfnet": mfnet.to_dict()})
    ckpt = save_checkpoint(model, resolve_model_config(MICRO), info, tmp_path / "ckpt")
    loaded, _, _ = load_checkpoint(ckpt)
    assert loaded.classifier == "linear" and loaded.class_set_names == (info.name,)
    loaded.select_class_set(info.name)
    with torch.no_grad():
        assert torch.equal(loaded(rgb, th)["logits"], a)


# --------------------------------------------------------------------------- ablations (paper Table VI)


@pytest.mark.parametrize(
    "sections, params",
    [
        ({"ma_clip": {"enabled": False}}, {"ma_clip": 0, "control": 0}),
        ({"prompts": {"aligned_tokens": 0}}, {"aligned_prompts": 0}),
        ({"dsrm": {"enabled": False}}, {"dsrm": 0}),
        (
            {"ma_clip": {"enabled": False}, "prompts": {"aligned_tokens": 0}, "dsrm": {"enabled": False}},
            {"ma_clip": 0, "control": 0, "aligned_prompts": 0, "prompt_gates": 0, "dsrm": 0},
        ),
    ],
)
def test_each_part_can_be_switched_off(info, sections, params):
    model = make(info, **sections).eval()
    assert isinstance(model, SegRGBX)
    counts: dict[str, int] = {}
    for n, p in model.named_parameters():
        counts[n.split(".")[0]] = counts.get(n.split(".")[0], 0) + p.numel()
    for part, expected in params.items():
        assert counts.get(part, 0) == expected, part
    with torch.no_grad():
        out = model(*pair(2))["logits"]
    assert out.shape == (2, info.num_classes, 64, 96) and torch.isfinite(out).all()


def test_config_errors_name_the_key(info):
    with pytest.raises(ValueError, match="modality must be one of"):
        make(info, modality="depth")
    with pytest.raises(ValueError, match="prompts.pairing must be one of"):
        make(info, prompts={"pairing": "sideways"})
    with pytest.raises(ValueError, match="ma_clip.image_size must be"):
        make(info, ma_clip={"image_size": [50, 64]})
    with pytest.raises(ValueError, match=r"class set name 'my set' \(class_sets.my set: the 'name' of its class"):
        make(info, class_sets={"my set": {**load_dataset_info("mfnet").to_dict(), "name": "my set"}})
    with pytest.raises(ValueError, match="class_sets.mfnet holds classes named 'pst900'"):
        make(info, class_sets={"mfnet": load_dataset_info("pst900").to_dict()})
    with pytest.raises(ValueError, match="head.classifier 'cosine' needs language.enabled: true"):
        make(info, language={"enabled": False}, head={"classifier": "cosine"})
    with pytest.raises(ValueError, match="head.classifier must be one of"):
        make(info, head={"classifier": "softmax"})
    with pytest.raises(ValueError, match="language.text_encoder 'clip' cannot embed the MA-CLIP stand-in's captions"):
        make(info, language={"text_encoder": "clip"})
    with pytest.raises(ValueError, match="lora.rank must be >= 0"):
        make(info, lora={"rank": -1})


# --------------------------------------------------------------------------- MA-CLIP's stage in practice


class _Scenes:
    """Synthetic items (the trainer's item format); ``thermal_noise``: thermal replaced by noise of that seed."""

    def __init__(self, count=16, thermal_noise=None):
        from rgbt_seg_ros.data.datasets import build_dataset

        synthetic = load_dataset_info("synthetic")
        self.data = build_dataset("synthetic", None, "train", synthetic, count=count, size=(64, 96))
        self.noise = thermal_noise

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[i]
        if self.noise is not None:
            item["thermal"] = np.random.default_rng([self.noise, i]).random(item["thermal"].shape, dtype=np.float32)
        return item


def test_ma_clip_pretraining_lowers_the_contrastive_loss(info):
    from rgbt_seg_ros.training.ma_clip import pretrain

    model = make(info)
    cfg = resolve_model_config(MICRO)
    cfg["ma_clip"]["pretrain"]["batch_size"] = 8
    rows = pretrain(model, [(_Scenes(), info.class_names)], cfg, 40, 0, torch.device("cpu"), log_every=1)
    losses = [r["contrastive"] for r in rows]
    assert len(rows) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
    assert not any(p.requires_grad for p in model.ma_clip.parameters())


def test_an_rgb_only_run_pretrains_ma_clip_without_thermal(info):
    from rgbt_seg_ros.training.ma_clip import pretrain

    cfg = resolve_model_config(MICRO)
    cfg["ma_clip"]["pretrain"]["batch_size"] = 4
    trained = []
    for noise in (1, 2):  # the same scenes with different thermal
        model = make(info)
        pretrain(model, [(_Scenes(8, noise), info.class_names)], cfg, 3, 0, torch.device("cpu"), blank_thermal=True)
        trained.append(model.ma_clip.proj.weight.detach())
    assert torch.equal(*trained)


def test_a_resumed_run_does_not_repeat_the_ma_clip_stage(tmp_path):
    import json

    from safetensors.torch import load_file

    from rgbt_seg_ros.training.trainer import Trainer

    info = load_dataset_info("synthetic")
    cfg = stage_run_config(max_steps=4, pretrain_steps=2)
    text = unit(info.num_classes)
    Trainer(MICRO, cfg, tmp_path / "a", text_embeddings=text).fit()
    Trainer(MICRO, cfg | {"stop_after_steps": 2}, tmp_path / "b", text_embeddings=text).fit()
    Trainer(MICRO, cfg, tmp_path / "b", text_embeddings=text, resume=True).fit()
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows] == ["pretrain"] * 2 + ["train"] * 4
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_segmenters_sharing_a_model_keep_their_own_class_set(info):
    from rgbt_seg_ros.pipeline.segmenter import Segmenter

    mfnet = load_dataset_info("mfnet")
    text = {"synthetic": unit(info.num_classes, seed=1), "mfnet": unit(mfnet.num_classes, seed=2)}
    model = make(info, text=text, class_sets={"mfnet": mfnet.to_dict()}).eval()
    cfg = model_cfg_of(info, mfnet)
    other = Segmenter(model, cfg, info, device="cpu", warmup=False, class_set="mfnet")
    mine = Segmenter(model, cfg, info, device="cpu", warmup=False)  # no set named: the one it was given
    assert other.class_set == "mfnet" and mine.class_set == "synthetic"
    rng = np.random.default_rng(0)
    rgb, thermal = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), rng.random((96, 128), dtype=np.float32)
    other(rgb, thermal)
    assert mine(rgb, thermal).labels.max() < info.num_classes and model.active_class_set == "synthetic"


def test_base_weights_come_from_ma_clips_frozen_trunk_when_the_backbone_is_fine_tuned(info, tmp_path):
    from rgbt_seg_ros.models.sam2_checkpoint import read_official_state_dict

    torch.save({"model": make(info, seed=3).sam2_state_dict()}, tmp_path / "base.pt")
    model = make(info, encoder={"checkpoint": str(tmp_path / "base.pt"), "freeze": False})
    with torch.no_grad():
        model.trunk.blocks[0].attn.q.weight.add_(1.0)  # the backbone trunk trains when not frozen
    official = read_official_state_dict(tmp_path / "base.pt")
    exported = model.sam2_state_dict()
    assert exported.keys() == official.keys()
    assert all(torch.equal(exported[k], official[k]) for k in official)


# --------------------------------------------------------------------------- MA-CLIP on a real CLIP (transformers)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP as transformers saves one (config, weights, tokenizer), with tiny random-init towers: what
    ``ma_clip.clip_dir`` points at. The tokenizer is CLIP's byte-level BPE with no merges (a token per
    character, the 256 byte symbols with and without CLIP's ``</w>``), so it is made offline; real CLIP
    tokenizers ship their vocabulary and merges. No pretrained weights are involved."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {c: i + 2 for i, c in enumerate(chars)}
    vocab |= {c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)}
    towers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**towers, "vocab_size": len(vocab), "max_position_embeddings": 77}
    text |= {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = CLIPConfig(
        text_config=text, vision_config={**towers, "image_size": 32, "patch_size": 8}, projection_dim=24
    )
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return str(path)


def test_ma_clip_is_clips_image_encoder_with_a_lora_pool(info, tiny_clip):
    from transformers import CLIPModel

    from rgbt_seg_ros.models.segrgbx_blocks import CLIP_MEAN, CLIP_STD, MAClipCLIP

    model = make(info, ma_clip={"clip_dir": tiny_clip}).eval()
    assert isinstance(model.ma_clip, MAClipCLIP) and model.ma_clip.embed_dim == 24
    assert model.control[0].mlp[0].in_features == 24 and model.dsrm.s_mlp[0].in_features == 24
    rgb, th = pair(2)
    with torch.no_grad():
        s_map, s = model.guidance(rgb, th.expand(-1, 3, -1, -1))
        logits = model(rgb, th)["logits"]
    assert s_map.shape == (4, 4, 4, 24) and s.shape == (4, 24) and logits.shape == (2, info.num_classes, 64, 96)
    # with LoRA B at zero, S^r is CLIP's own image embedding of the RGB image, in CLIP's normalisation
    norm = resolve_model_config(MICRO)["normalization"]["rgb"]
    raw = rgb * torch.tensor(norm["std"]).view(1, 3, 1, 1) + torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    pixels = (raw - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = F.interpolate(pixels, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        want = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(s[:2], want, atol=1e-5, rtol=1e-5)
    # the pool: one adapter per X modality on the vision encoder's q and v; it changes S once trained
    layers = [m for n, m in model.ma_clip.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert layers and all(list(m.lora_A) == ["thermal"] for m in layers)
    randomize_named(model, ("ma_clip.vision_model.encoder.layers.0.self_attn.v_proj.lora_B",))
    with torch.no_grad():
        assert not torch.allclose(model.guidance(rgb, th.expand(-1, 3, -1, -1))[1], s)
    with pytest.raises(ValueError, match="no LoRA for modality 'depth'"):
        model.ma_clip(rgb, th.expand(-1, 3, -1, -1), "depth")


def test_ma_clip_embeds_captions_with_clips_text_encoder(info, tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    model = make(info, ma_clip={"clip_dir": tiny_clip})
    captions = ["a scene at night with two people", "a scene in daylight with a road"]
    got = model.ma_clip.embed_captions(captions)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip)
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        tokens = tokenizer(captions, padding=True, return_tensors="pt")
        want = F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
    assert got.shape == (2, 24)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not any(k.startswith("ma_clip.text") for k in model.state_dict())  # not part of the model's state


def test_ma_clip_pretraining_on_clip_trains_the_lora_pool_only(info, tiny_clip, tmp_path):
    from rgbt_seg_ros.training.ma_clip import pretrain

    cfg = resolve_model_config(MICRO)
    cfg["ma_clip"]["clip_dir"] = tiny_clip
    cfg["ma_clip"]["pretrain"]["batch_size"] = 4
    torch.manual_seed(0)
    model = build_model(cfg, info, None)
    names = {n for n, p in model.named_parameters() if any(p is q for q in model.ma_clip_parameters())}
    assert names and all(".lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.ma_clip.named_parameters()}
    rows = pretrain(model, [(_Scenes(8), info.class_names)], cfg, 3, 0, torch.device("cpu"), log_every=1)
    assert len(rows) == 3 and all(np.isfinite(r["contrastive"]) for r in rows)
    after = dict(model.ma_clip.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert moved and all(".lora_" in n for n in moved)
    assert not any(p.requires_grad for p in model.ma_clip.parameters())
    # the CLIP model round-trips through a checkpoint (its vision weights are stored with the model)
    model.eval()
    rgb, th = pair()
    with torch.no_grad():
        expected = model(rgb, th)["logits"]
    loaded, _, _ = load_checkpoint(save_checkpoint(model, cfg, info, tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(loaded(rgb, th)["logits"], expected)
    with pytest.raises(FileNotFoundError, match="ma_clip.clip_dir .* is not a CLIP model directory"):
        make(info, ma_clip={"clip_dir": str(tmp_path)})


# ---------------------------------------------------------------- the shared backend contract


def _encoder_freeze(cfg: dict, path: str) -> None:
    cfg["encoder"].update(checkpoint=path, freeze=True)


def _rgb_stream(model, rgb, thermal) -> dict:
    """The RGB stream's four stage maps that forward fuses, through the model's own stream_features."""
    with torch.no_grad():
        stages = model.stream_features(rgb, thermal)
    return {f"stage{i}": x_r for i, (x_r, _) in enumerate(stages, 1)}


SEGRGBX_CASE = BackendCase(
    name="segrgbx",
    config=MICRO,
    # on base weights the trunk's LoRA (".lora_") trains with these; the trunk itself and MA-CLIP do not
    # (MA-CLIP trains only in its own stage, tested above)
    trainable_prefixes=("control.", "aligned_prompts.", "prompt_gates.", "frm.", "ffm.", "dsrm.", "head."),
    frozen_prefixes=("trunk.", "ma_clip."),
    thermal_param="aligned_prompts.thermal.0",
    freeze_with_base=_encoder_freeze,
    randomize=_moved,  # LoRA B, the prompt and FRM gates, the DSRM output: every zero-init part
    tiny_config="models/segrgbx_tiny.yaml",
    identity_kind="trunk",
    identity=_rgb_stream,
)


class TestSegRGBXContract(BackendContract):
    case = SEGRGBX_CASE
