"""FusionSAM backend: VQ straight-through and codebook usage, FMP structure, dense prompt, optional LSTG terms."""

import copy

import pytest
import torch
import torch.nn.functional as F

from rgbt_seg_ros.classes import load_dataset_info
from rgbt_seg_ros.models import build_model, resolve_model_config
from rgbt_seg_ros.models.fusionsam import FusionSAM
from rgbt_seg_ros.models.fusionsam_blocks import BidirectionalCrossAttention, FusionMaskPrompting, windowed_attention
from rgbt_seg_ros.models.vq import VectorQuantizer, VQAutoencoder

MICRO = "models/fusionsam_micro.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny tensors


def make(info, seed=0, **lstg):
    cfg = resolve_model_config(MICRO)
    cfg["lstg"].update(lstg)
    torch.manual_seed(seed)
    return build_model(cfg, info)


def pair(b=1, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randn(b, 1, h, w, generator=g)


# --------------------------------------------------------------------------- LSTG
def test_quantizer_picks_nearest_codes_with_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, beta=0.25)
    with torch.no_grad():
        vq.codebook.weight.normal_()
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    z_q, idx, loss = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, vq.codebook.weight.detach()).argmin(1)
    assert torch.equal(idx.flatten(), nearest)
    assert torch.allclose(z_q, vq.codebook.weight[idx].permute(0, 3, 1, 2))
    # eq. 6: codebook term + beta * commitment term, both the same squared distance in value
    assert torch.allclose(loss, 1.25 * F.mse_loss(z_q, z), atol=1e-6)
    g = torch.randn_like(z)
    (z_q * g).sum().backward()
    assert torch.equal(z.grad, g)  # straight-through: identity gradient
    assert vq.codebook.weight.grad is None  # the codebook learns from the loss only
    z.grad = None
    loss.backward()
    used = set(idx.flatten().tolist())
    grad_rows = {i for i in range(16) if vq.codebook.weight.grad[i].abs().sum() > 0}
    assert grad_rows == used


def test_codebook_usage_statistics():
    vq = VectorQuantizer(8, 2)
    frac, perplexity = vq.usage(torch.arange(8).repeat(3))
    assert frac == 1.0 and perplexity == pytest.approx(8.0)
    frac, perplexity = vq.usage(torch.zeros(10, dtype=torch.long))
    assert frac == 1 / 8 and perplexity == pytest.approx(1.0)


def test_autoencoder_shapes_and_bad_downsample():
    ae = VQAutoencoder(1, hidden=16, latent_dim=8, num_codes=32, downsample=4)
    x = torch.randn(2, 1, 32, 48)
    z_q, idx, _ = ae.encode(x)
    assert z_q.shape == (2, 8, 8, 12) and idx.shape == (2, 8, 12)
    assert ae.decode(z_q).shape == x.shape
    with pytest.raises(ValueError, match="power of two"):
        VQAutoencoder(3, 16, 8, 32, downsample=3)


def test_micro_model_uses_many_codes_and_reconstruction_trains(info):
    model = make(info).train()
    out = model(*pair(2))
    for m in ("rgb", "thermal"):
        frac, perplexity = model.lstg[m].quantizer.usage(out["codes"][m])
        assert frac > 2 / model.lstg[m].quantizer.num_codes and perplexity > 2, m
    model.zero_grad()
    out["aux_losses"]["lstg_rec"].backward()
    assert model.lstg["rgb"].encoder[0].weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert model.lstg["thermal"].decoder[-1].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- FMP
def test_windowed_attention_is_local_and_global_when_the_window_covers_the_map():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 10, 8) for _ in range(3))
    glob = windowed_attention(q, k, v, heads=2, window=0)
    assert torch.allclose(windowed_attention(q, k, v, 2, window=16), glob)
    ref = F.scaled_dot_product_attention(*(t.reshape(2, 60, 2, 4).transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert torch.allclose(glob, ref.reshape(2, 6, 10, 8), atol=1e-6)
    # window 4 on a 6x10 map (padded): changing a key in window (0, 0) leaves window (1, 2) untouched
    local = windowed_attention(q, k, v, 2, window=4)
    k2 = k.clone()
    k2[:, 0, 0] += 5
    local2 = windowed_attention(q, k2, v, 2, window=4)
    assert torch.equal(local[:, 4:, 8:], local2[:, 4:, 8:])
    assert not torch.allclose(local[:, :4, :4], local2[:, :4, :4])
    assert torch.isfinite(local).all()


def test_bidirectional_cross_attention_is_symmetric_under_tied_weights():
    torch.manual_seed(0)
    cross = BidirectionalCrossAttention(8, heads=2, window=4)
    with torch.no_grad():
        cross.qkv2.load_state_dict(cross.qkv1.state_dict())
        cross.norm2.weight.normal_()
        cross.norm1.load_state_dict(cross.norm2.state_dict())
    a, b = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    ab1, ab2 = cross(a, b)
    ba1, ba2 = cross(b, a)
    assert torch.allclose(ab1, ba2, atol=1e-6) and torch.allclose(ab2, ba1, atol=1e-6)
    # eq. 10: the residual is the query projection of the same modality
    q1 = cross.qkv1(a).chunk(3, dim=-1)[0]
    with torch.no_grad():
        cross.norm1.weight.zero_()
        cross.norm1.bias.zero_()
    assert torch.allclose(cross(a, b)[0], q1)


def test_fmp_combines_both_modalities():
    torch.manual_seed(0)
    fmp = FusionMaskPrompting(8, heads=2, window=4).eval()
    z1, z2 = torch.randn(1, 8, 8, 12), torch.randn(1, 8, 8, 12)
    with torch.no_grad():
        out = fmp(z1, z2)
        assert out.shape == z1.shape
        assert not torch.allclose(out, fmp(z1, z2 * 2))
        assert not torch.allclose(out, fmp(z1 * 2, z2))


# --------------------------------------------------------------------------- prompt and heads
def test_fusion_mask_is_the_dense_prompt(info):
    model = make(info).eval()
    assert isinstance(model, FusionSAM)
    rgb, th = pair()
    with torch.no_grad():
        base = model(rgb, th)
        model.sam_head.no_mask_embed.weight.add_(3.0)  # unused: the fusion mask replaces it
        assert torch.equal(model(rgb, th)["logits"], base["logits"])
        assert base["fusion_mask"].shape == (1, 16, 16, 24)
        d = model.image_encoder.neck.d_model
        dense = model.prompt_encoder(base["fusion_mask"], (4, 6))
        assert dense.shape == (1, d, 4, 6)
    with pytest.raises(ValueError, match="dense prompt"):
        model.sam_head(
            torch.zeros(1, d, 4, 6),
            torch.zeros(1, d // 4, 8, 12),
            torch.zeros(1, d // 8, 16, 24),
            dense=torch.zeros(1, d, 2, 2),
        )


def test_optional_perceptual_and_adversarial_terms(info):
    model = make(info).train()
    assert set(model(*pair(2))["aux_losses"]) == {"lstg_rec", "lstg_commit"}
    model = make(info, perceptual_weight=0.5, adversarial_weight=0.1).train()
    aux = model(*pair(2))["aux_losses"]
    assert set(aux) == {"lstg_rec", "lstg_commit", "lstg_perceptual", "lstg_adv_d", "lstg_adv_g"}
    disc = list(model.discriminators.parameters())
    dec = list(model.lstg["rgb"].decoder.parameters())
    # the generator term moves the generator only, the discriminator term the discriminator only
    model.zero_grad()
    aux["lstg_adv_g"].backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in disc)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dec)
    model.zero_grad()
    aux["lstg_adv_d"].backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dec)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc)
    model.zero_grad()
    aux["lstg_perceptual"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dec)


def test_config_errors_and_tiny_defaults(info):
    cfg = resolve_model_config(MICRO)
    for key, value, match in (
        ("downsample", 3, "power of two"),
        ("downsample", 32, "<= 16"),
        ("rec_weight", -1.0, "weights must be >= 0"),
    ):
        bad = copy.deepcopy(cfg)
        bad["lstg"][key] = value
        with pytest.raises(ValueError, match=match):
            build_model(bad, info)
    tiny = resolve_model_config("models/fusionsam_tiny.yaml")
    assert tiny["input_size"] == [480, 640] and tiny["encoder"]["freeze"] is True
    assert tiny["lstg"]["downsample"] == 4 and tiny["lstg"]["perceptual_weight"] == 0.0
    assert tiny["lstg"]["adversarial_weight"] == 0.0 and tiny["decoder"]["freeze_transformer"] is False
    with pytest.raises(ValueError, match="encoder.checkpoint is not set"):
        build_model(tiny, load_dataset_info("mfnet"))
