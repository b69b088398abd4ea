"""FusionSAM backend: the shared EMA codebook (k-means init, dead-code restarts, statistics) and its
balance between the modalities, FMP structure and its shifted windows, the fusion reaching the image
encoder, the dense and point prompts, optional LSTG terms, the shared backend contract (identity at
init: what SAM2's mask decoder receives equals sam2's own features)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from backend_contract import BackendCase, BackendContract, decoder_inputs, randomize_named

from rgbt_seg_ros.models import build_model, resolve_model_config
from rgbt_seg_ros.models.classes import load_dataset_info
from rgbt_seg_ros.models.fusionsam import POSITIVE_POINT_KEY, FusionSAM
from rgbt_seg_ros.models.fusionsam_blocks import (
    BidirectionalCrossAttention,
    FusionMaskPrompting,
    FusionPointPrompts,
    windowed_attention,
)
from rgbt_seg_ros.models.vq import (
    LatentAutoencoder,
    LatentSpaceTokenGenerator,
    RunningStandardizer,
    VectorQuantizer,
    code_statistics,
)

MICRO = "models/fusionsam_micro.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny tensors


def make(info, seed=0, cfg=None, **lstg):
    cfg = cfg or resolve_model_config(MICRO)
    cfg["lstg"].update(lstg)
    torch.manual_seed(seed)
    return build_model(cfg, info)


def pair(b=1, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randn(b, 1, h, w, generator=g)


def set_codebook(vq, codes, count=1.0):
    """Put ``codes`` in the codebook as if each had been assigned ``count`` latents per batch."""
    with torch.no_grad():
        vq.codebook.copy_(codes)
        vq.cluster_size.fill_(count)
        vq.embed_sum.copy_(codes * count)
        vq.initialized.fill_(True)


def usage(idx, num_codes):
    """(fraction of codes used, perplexity) as floats, from the model's own code_statistics."""
    stats = code_statistics(idx, num_codes)
    return float(stats["usage"]), float(stats["perplexity"])


# --------------------------------------------------------------------------- LSTG: the shared codebook
def test_quantizer_picks_nearest_codes_with_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, beta=0.25).eval()
    set_codebook(vq, torch.randn(16, 4))
    assert not list(vq.parameters())  # the codebook is EMA-updated state, no optimiser touches it
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    z_q, idx, loss = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, vq.codebook).argmin(1)
    assert torch.equal(idx.flatten(), nearest)
    assert torch.allclose(z_q, vq.codebook[idx].permute(0, 3, 1, 2))
    # eq. 6: codebook term + beta * commitment term, both the same squared distance in value
    assert torch.allclose(loss, 1.25 * F.mse_loss(z_q, z), atol=1e-6)
    g = torch.randn_like(z)
    (z_q * g).sum().backward()
    assert torch.equal(z.grad, g)  # straight-through: identity gradient
    z.grad = None
    loss.backward()  # the gradient of eq. 6 is the commitment term: beta * 2 (z - q) / numel
    expected = 0.25 * 2 * (z - z_q).detach() / z.numel()
    assert torch.allclose(z.grad, expected, atol=1e-7)


def test_codebook_usage_statistics():
    vq = VectorQuantizer(8, 2)
    frac, perplexity = usage(torch.arange(8).repeat(3), vq.num_codes)
    assert frac == 1.0 and perplexity == pytest.approx(8.0)
    frac, perplexity = usage(torch.zeros(10, dtype=torch.long), vq.num_codes)
    assert frac == 1 / 8 and perplexity == pytest.approx(1.0)
    stats = code_statistics(torch.tensor([0, 0, 1, 1]), 4)
    assert float(stats["usage"]) == 0.5 and float(stats["perplexity"]) == pytest.approx(2.0)


def test_ema_update_moves_codes_to_the_mean_of_their_latents():
    torch.manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    data = (centres.repeat_interleave(50, 0) + 0.3 * torch.randn(200, 2)).T.reshape(1, 2, 10, 20)
    start = centres + 1.0
    vq = VectorQuantizer(4, 2, decay=0.9, dead_threshold=0.0, kmeans_iters=0).train()
    set_codebook(vq, start, count=50.0)
    flat = data.permute(0, 2, 3, 1).reshape(-1, 2)
    _, idx, _ = vq(data)
    means = torch.stack([flat[idx.flatten() == k].mean(0) for k in range(4)])
    before = (start - means).norm(dim=1)
    after = (vq.codebook - means).norm(dim=1)
    assert (after < 0.95 * before).all()
    # the EMA of counts and sums: 0.9 * old + 0.1 * batch, code = sum / count (up to Laplace smoothing)
    ema = (0.9 * start * 50 + 0.1 * means * 50) / 50
    assert torch.allclose(vq.codebook, ema, atol=1e-3)
    vq.eval()
    frozen = vq.codebook.clone()
    vq(data)
    assert torch.equal(vq.codebook, frozen)  # eval mode: no update


def test_kmeans_initialisation_puts_a_code_on_every_cluster():
    torch.manual_seed(0)
    centres = torch.tensor([[6.0, 0.0], [-6.0, 0.0], [0.0, 6.0], [0.0, -6.0]])
    data = (centres.repeat_interleave(64, 0) + 0.2 * torch.randn(256, 2)).T.reshape(1, 2, 16, 16)
    vq = VectorQuantizer(4, 2, decay=0.99, dead_threshold=0.0, kmeans_iters=10).train()
    assert not bool(vq.initialized)
    vq(data)
    assert bool(vq.initialized)
    nearest = torch.cdist(centres, vq.codebook).min(dim=1)
    assert (nearest.values < 0.3).all() and len(set(nearest.indices.tolist())) == 4
    assert usage(vq.eval()(data)[1], vq.num_codes)[0] == 1.0


@pytest.mark.parametrize("threshold, revived", [(1.0, True), (0.0, False)])
def test_dead_code_restart_revives_unused_codes(threshold, revived):
    torch.manual_seed(0)
    data = torch.randn(2, 4, 8, 8)
    vq = VectorQuantizer(16, 4, decay=0.99, dead_threshold=threshold, kmeans_iters=0).train()
    codes = torch.randn(16, 4) * 0.5
    codes[4:] += 100.0  # 12 codes far from every latent: never assigned
    set_codebook(vq, codes, count=1.0)
    assert usage(vq(data)[1], vq.num_codes)[0] == 4 / 16  # the lookup uses the codebook as it was
    dead_after = (vq.codebook[4:] - 100.0).norm(dim=1) > 50  # moved from the far cluster
    frac, perplexity = usage(vq.eval()(data)[1], vq.num_codes)
    if revived:
        assert dead_after.all()
        assert vq.codebook[4:].abs().max() < 10  # restarted at latents of the batch
        assert frac > 12 / 16 and perplexity > 6
        assert (vq.cluster_size >= threshold).all()
    else:
        assert not dead_after.any() and frac == 4 / 16


def test_lstg_has_one_codebook_that_both_modalities_index(info):
    model = make(info).train()
    quantizers = [m for m in model.modules() if isinstance(m, VectorQuantizer)]
    assert quantizers == [model.lstg.quantizer]
    assert [k for k in model.state_dict() if k.endswith(".codebook")] == ["lstg.quantizer.codebook"]
    rgb, th = pair(2)
    out = model(rgb, th)
    h, w = out["codes"]["rgb"].shape[-2:]
    # the first training forward initialised the codebook on the tokens of BOTH modalities
    assert float(model.lstg.quantizer.cluster_size.sum()) == pytest.approx(2 * 2 * h * w, rel=1e-4)
    model.eval()
    with torch.no_grad():
        out = model(rgb, th)
        codebook = model.lstg.quantizer.codebook
        for m, image in (("rgb", rgb), ("thermal", th)):
            # the codebook sees the encoder output on the modality's common scale (running statistics)
            norm = model.lstg.standardizers[m]
            scale = norm.var.mean().clamp_min(norm.eps).sqrt()
            z = (model.lstg[m].encoder(image) - norm.mean.reshape(1, -1, 1, 1)) / scale
            z = z.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
            assert torch.equal(out["codes"][m].flatten(), torch.cdist(z, codebook).argmin(1)), m
    assert set(out["codes"]["rgb"].unique().tolist()) | set(out["codes"]["thermal"].unique().tolist()) <= set(
        range(model.lstg.quantizer.num_codes)
    )


def test_micro_model_uses_most_codes_and_reports_perplexity(info):
    model = make(info).train()
    rgb, th = pair(2)
    model(rgb, th)  # k-means initialisation + EMA update on this batch
    model.eval()
    with torch.no_grad():
        out = model(rgb, th)
    k = model.lstg.quantizer.num_codes
    stats = out["codebook"]
    assert set(stats) == {"perplexity", "usage", "perplexity_rgb", "perplexity_thermal", "usage_rgb", "usage_thermal"}
    both = torch.cat([out["codes"]["rgb"].flatten(), out["codes"]["thermal"].flatten()])
    assert float(stats["usage"]) == pytest.approx(len(both.unique()) / k)
    assert float(stats["perplexity"]) == pytest.approx(usage(both, k)[1], rel=1e-5)
    for m in ("rgb", "thermal"):  # the same per modality, from that modality's codes only
        frac, perplexity = usage(out["codes"][m], k)
        assert float(stats[f"usage_{m}"]) == pytest.approx(frac)
        assert float(stats[f"perplexity_{m}"]) == pytest.approx(perplexity, rel=1e-5)
    assert float(stats["usage"]) > 0.75 and float(stats["perplexity"]) > k / 4
    model.train()
    assert float(model(rgb, th)["codebook"]["restarted"]) >= 0  # training mode also counts restarts


def test_reconstruction_trains_the_autoencoders_through_the_straight_through_estimator(info):
    model = make(info).train()
    out = model(*pair(2))
    model.zero_grad()
    out["aux_losses"]["lstg_rec"].backward()
    assert model.lstg["rgb"].encoder[0].weight.grad.abs().sum() > 0
    assert model.lstg["thermal"].decoder[-1].weight.grad.abs().sum() > 0


def test_autoencoder_shapes_and_bad_settings():
    lstg = LatentSpaceTokenGenerator({"rgb": 3, "thermal": 1}, hidden=16, latent_dim=8, num_codes=32, downsample=4)
    images = {"rgb": torch.randn(2, 3, 32, 48), "thermal": torch.randn(2, 1, 32, 48)}
    latents, codes, commits, stats = lstg.eval()(images)
    assert latents["thermal"].shape == (2, 8, 8, 12) and codes["rgb"].shape == (2, 8, 12)
    assert lstg["thermal"].decode(latents["thermal"]).shape == images["thermal"].shape
    assert set(commits) == {"rgb", "thermal"} and set(stats) >= {"perplexity", "usage"}
    with pytest.raises(ValueError, match="power of two"):
        LatentAutoencoder(3, 16, 8, downsample=3)
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(8, 2, decay=1.0)


# --------------------------------------------------------------------------- LSTG: balance between the modalities
def test_standardizer_centres_and_scales_a_modality_without_reshaping_it():
    torch.manual_seed(0)
    norm = RunningStandardizer(3, decay=0.9)
    z = torch.randn(2, 3, 4, 5) * torch.tensor([0.01, 0.02, 0.04]).reshape(1, 3, 1, 1) + 7.0
    assert torch.equal(norm.eval()(z), z)  # untrained: the identity
    out = norm.train()(z)  # the first training batch sets the statistics
    flat = out.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-4)
    assert float(flat.var(1, correction=0).mean()) == pytest.approx(1.0, rel=1e-3)  # one common scale ...
    ratio = flat.std(1) / z.transpose(0, 1).reshape(3, -1).std(1)
    assert torch.allclose(ratio, ratio[0].expand(3), rtol=1e-4)  # ... the same for every channel: shape kept
    mean, var = norm.mean.clone(), norm.var.clone()
    z2 = z * 3.0
    norm(z2)  # then an EMA with the decay
    batch_mean = z2.mean(dim=(0, 2, 3))
    assert torch.allclose(norm.mean, 0.9 * mean + 0.1 * batch_mean, atol=1e-5)
    assert torch.allclose(norm.var, 0.9 * var + 0.1 * z2.var(dim=(0, 2, 3), correction=0), rtol=1e-4)
    norm.eval()
    frozen = norm.mean.clone()
    expected = (z - norm.mean.reshape(1, 3, 1, 1)) / norm.var.mean().clamp_min(norm.eps).sqrt()
    assert torch.allclose(norm(z), expected, atol=1e-5) and torch.equal(norm.mean, frozen)  # eval: running values


def synthetic_batch(info, cfg, split, count, seed):
    """Normalised synthetic RGB-T images (count, C, 96, 128), as the trainer feeds them."""
    from rgbt_seg_ros.data.datasets import build_dataset
    from rgbt_seg_ros.models.preprocessing import normalize_batch

    data = build_dataset("synthetic", None, split, info, count=count, seed=seed, size=[96, 128])
    rgb = torch.stack([torch.as_tensor(data[i]["rgb"]) for i in range(count)])
    thermal = torch.stack([torch.as_tensor(data[i]["thermal"]) for i in range(count)])
    return normalize_batch(cfg, rgb, thermal)


def test_thermal_tokens_keep_many_codes_when_their_latents_are_on_another_scale(info):
    """The thermal encoder's output scaled by 0.02 (thermal latents ~50x smaller than RGB's, as two
    independently trained or initialised encoders can give), then 30 steps of LSTG training (its own losses,
    Adam) on synthetic scenes: thermal tokens must still use many of the 64 codes, comparably to RGB's.

    Measured (micro config): before the per-modality standardisation, thermal perplexity 1.0 after the
    k-means initialisation (RGB 40) and 2.6 on held-out scenes after training (RGB 9.3): every thermal
    token on two or three codes. With it 16.7 (RGB 29) and 9.6 (RGB 11.4), thermal usage 18 codes."""
    cfg = resolve_model_config(MICRO)
    model = make(info, cfg=cfg)
    lstg, k = model.lstg, model.lstg.quantizer.num_codes
    with torch.no_grad():
        lstg["thermal"].encoder[-1].weight.mul_(0.02)
        lstg["thermal"].encoder[-1].bias.mul_(0.02)
    train_rgb, train_th = synthetic_batch(info, cfg, "train", 32, 0)
    test_rgb, test_th = synthetic_batch(info, cfg, "test", 8, 1)
    opt = torch.optim.Adam(lstg.parameters(), lr=1e-3)
    lstg.train()
    for step in range(30):
        i = torch.arange(4) + 4 * (step % 8)
        images = {"rgb": train_rgb[i], "thermal": train_th[i]}
        latents, codes, commits, _ = lstg(images)
        if step == 0:  # the k-means initialisation on this batch
            first = {m: usage(codes[m], k)[1] for m in codes}
            assert first["thermal"] >= 8.0, f"after k-means: perplexity {first}"
        rec = sum(F.mse_loss(lstg[m].decode(latents[m]), images[m]) for m in images)
        opt.zero_grad()
        (rec + sum(commits.values())).backward()
        opt.step()
    lstg.eval()
    with torch.no_grad():
        _, codes, _, _ = lstg({"rgb": test_rgb, "thermal": test_th})
    (rgb_used, rgb_perplexity), (th_used, th_perplexity) = usage(codes["rgb"], k), usage(codes["thermal"], k)
    seen = f"thermal: {th_used * k:.0f} codes, perplexity {th_perplexity:.2f}"
    seen += f"; RGB: {rgb_used * k:.0f} codes, perplexity {rgb_perplexity:.2f}"
    assert th_perplexity >= 5.0 and th_used * k >= 10, seen
    assert th_perplexity >= 0.5 * rgb_perplexity, seen


def test_dead_codes_restart_at_the_under_served_modality():
    """Codes near RGB's tokens only: thermal's tokens all share one code. The dead codes restart at
    thermal tokens (the modality with the lower perplexity), not at RGB's; ``restart_from: batch`` draws
    from both."""
    torch.manual_seed(0)
    rgb = torch.randn(2, 2, 8, 8) * 0.5 + 5.0  # RGB tokens around (5, 5), thermal around (-5, -5)
    thermal = torch.randn(2, 2, 8, 8) * 0.5 - 5.0
    codes = torch.cat([torch.randn(8, 2) * 0.5 + 5.0, torch.full((1, 2), -5.0), torch.randn(7, 2) + 100.0])
    for source, only_thermal in (("underserved", True), ("batch", False)):
        vq = VectorQuantizer(16, 2, decay=0.99, dead_threshold=1.0, kmeans_iters=0, restart_from=source).train()
        set_codebook(vq, codes, count=1.0)
        _, idx, restarted = vq.quantize(torch.cat([rgb, thermal]), groups=[2, 2])
        assert restarted == 7 and usage(idx[2:], 16)[1] == pytest.approx(1.0)  # thermal: one code
        fresh = vq.codebook[9:]
        near_thermal = (fresh + 5.0).norm(dim=1) < 3.0
        assert near_thermal.all() if only_thermal else not near_thermal.all(), (source, fresh)
    with pytest.raises(ValueError, match="restart_from"):
        VectorQuantizer(16, 2, restart_from="rgb")


def test_per_modality_codebook_statistics_reach_the_trainer_metrics(info, tmp_path):
    import json

    from rgbt_seg_ros.training.trainer import Trainer

    cfg = {
        "dataset": "synthetic",
        "dataset_options": {"count": 4, "size": [64, 96]},
        "val_split": None,
        "max_steps": 2,
        "batch_size": 2,
        "warmup_steps": 0,
        "log_every": 1,
        "progress": False,
        "tensorboard": False,
        "model": {"input_size": [64, 96]},
    }
    tr = Trainer(MICRO, cfg, tmp_path / "run")
    tr.fit()
    tr.close()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    row = [r for r in rows if r["type"] == "train"][-1]
    for m in ("rgb", "thermal"):
        assert row[f"codebook_perplexity_{m}"] >= 1.0 and 0.0 < row[f"codebook_usage_{m}"] <= 1.0, row


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


def masked_reference(q, k, v, heads, window, shift):
    """Global attention restricted to pairs of tokens in the same window of the grid whose windows
    start at rows and columns ``-shift + i * window``."""
    b, h, w, c = q.shape
    rows, cols = (torch.arange(h) + shift) // window, (torch.arange(w) + shift) // window
    cell = (rows[:, None] * (w + window) + cols[None, :]).flatten()
    split = [t.reshape(b, h * w, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split, attn_mask=cell[:, None] == cell[None, :])
    return out.transpose(1, 2).reshape(b, h, w, c)


@pytest.mark.parametrize("size", [(8, 12), (6, 10), (5, 13)])
@pytest.mark.parametrize("shift", [0, 2, 3])
def test_shifted_windows_are_windows_of_a_moved_grid(size, shift):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, *size, 8) for _ in range(3))
    expected = masked_reference(q, k, v, 2, 4, shift)
    assert torch.allclose(windowed_attention(q, k, v, 2, 4, shift), expected, atol=1e-5)
    with pytest.raises(ValueError, match="shift"):
        windowed_attention(q, k, v, 2, 4, 4)


def test_shifted_windows_carry_a_key_across_the_regular_window_border():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 12, 8) for _ in range(3))

    def reached(shift):
        k2 = k.clone()
        k2[:, 2, 3] += 5.0  # in regular window rows 0-3, cols 0-3; shifted by 2: rows 2-5, cols 2-5
        diff = (windowed_attention(q, k2, v, 2, 4, shift) - windowed_attention(q, k, v, 2, 4, shift)).abs()
        return diff.amax(-1)[0] > 0

    regular, shifted = torch.zeros(8, 12, dtype=torch.bool), torch.zeros(8, 12, dtype=torch.bool)
    regular[0:4, 0:4] = True
    shifted[2:6, 2:6] = True
    assert torch.equal(reached(0), regular)
    assert torch.equal(reached(2), shifted)  # queries of three other regular windows see the key


@pytest.mark.parametrize("shift", [False, True])
def test_fmp_passes_information_across_window_borders_only_with_shifted_windows(shift):
    """One FMP pass, its 3x3 convs reduced to their centre taps so that only attention moves information
    between positions: a thermal change inside regular window (0, 0) reaches other windows' outputs only
    when the cross-attention's grid is shifted by half a window."""
    torch.manual_seed(0)
    fmp = FusionMaskPrompting(8, heads=2, window=4, shift=shift).eval()
    assert fmp.shift == (2 if shift else 0) and fmp.cross.shift == fmp.shift
    assert fmp.self_rgb.window == fmp.window and fmp.shift < fmp.window
    with torch.no_grad():
        for conv in (fmp.fusion_conv, fmp.out_conv):
            centre = conv.weight[..., 1, 1].clone()
            conv.weight.zero_()
            conv.weight[..., 1, 1] = centre
        z1, z2 = torch.randn(1, 8, 8, 12), torch.randn(1, 8, 8, 12)
        z2b = z2.clone()
        z2b[:, :, 1, 2] += 3.0  # inside regular window rows 0-3, cols 0-3
        changed = (fmp(z1, z2b) - fmp(z1, z2)).abs().amax(1)[0] > 0
    inside = torch.zeros(8, 12, dtype=torch.bool)
    inside[0:4, 0:4] = True
    assert changed[inside].all()
    if shift:  # the shifted cross-attention window (rows 2-5, cols 2-5) spans four regular windows
        assert changed[0:4, 4:8].all() and changed[4:8, 0:4].all() and changed[4:8, 4:8].all()
        assert not changed[:, 8:].any()  # one shifted layer reaches one window further, not more
    else:
        assert not changed[~inside].any()


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


# --------------------------------------------------------------------------- the fusion in SAM2
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
        dense = model.prompt_encoder.dense(base["fusion_mask"], (4, 6))
        assert dense.shape == (1, d, 4, 6)
        for p in model.prompt_encoder.dense.parameters():
            p.add_(0.1)
        assert not torch.allclose(model(rgb, th)["logits"], base["logits"])
    with pytest.raises(ValueError, match="dense prompt"):
        model.sam_head(
            torch.zeros(1, d, 4, 6),
            torch.zeros(1, d // 4, 8, 12),
            torch.zeros(1, d // 8, 16, 24),
            dense=torch.zeros(1, d, 2, 2),
        )


def test_the_fusion_reaches_the_image_encoder(info):
    model = make(info).eval()
    rgb, th = pair()
    with torch.no_grad():
        fusion = model(rgb, th)["fusion_mask"]
        # zero-initialised projection: the encoder computes exactly SAM2's ImageEncoder on RGB
        reference = model.image_encoder(rgb)["backbone_fpn"]
        for a, b in zip(model.image_features(rgb, fusion), reference):
            assert torch.equal(a, b)
        proj = model.prompt_encoder.image.proj
        proj.weight.normal_(0.0, 0.5)
    inputs = []
    hook = model.image_encoder.trunk.blocks[0].register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    try:
        th = th.clone().requires_grad_(True)
        model(rgb, th)
        inputs[-1].square().sum().backward()
        assert th.grad is not None and th.grad.abs().sum() > 0  # thermal -> LSTG -> FMP -> the encoder's tokens
        with torch.no_grad():  # changing thermal changes the encoder's stride-16 features
            sfm = model.image_features(rgb, model(rgb, th)["fusion_mask"])[-1]
            sfm_other = model.image_features(rgb, model(rgb, th.flip(-1) * 2)["fusion_mask"])[-1]
        assert (sfm - sfm_other).abs().max() > 1e-4
    finally:
        hook.remove()
    # without the encoder input the encoder's tokens do not depend on thermal
    cfg = resolve_model_config(MICRO)
    cfg["prompt"]["encoder_input"] = False
    plain = make(info, cfg=cfg).eval()
    assert plain.prompt_encoder.image is None
    inputs.clear()
    hook = plain.image_encoder.trunk.blocks[0].register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    try:
        th = th.detach().clone().requires_grad_(True)
        plain(rgb, th)
        assert torch.autograd.grad(inputs[-1].sum(), th, allow_unused=True)[0] is None
    finally:
        hook.remove()


def test_encoder_input_projection_trains_through_the_frozen_encoder(info, tmp_path):
    source = make(info, seed=3)
    state = source.sam2_state_dict()
    positive = torch.randn(1, source.image_encoder.neck.d_model)
    state[POSITIVE_POINT_KEY] = positive
    torch.save({"model": state}, tmp_path / "base.pt")
    cfg = resolve_model_config(MICRO)
    cfg["encoder"].update(checkpoint=str(tmp_path / "base.pt"), freeze=True)
    model = make(info, seed=7, cfg=cfg).train()
    # the point embedding starts as SAM2's positive-point embedding
    assert torch.equal(model.prompt_encoder.points.point_embed.weight, positive)
    out = model(*pair(2))
    out["logits"].logsumexp(1).mean().backward()
    assert model.prompt_encoder.image.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert not any(p.requires_grad for p in model.image_encoder.parameters())


def test_point_prompts_are_the_peaks_of_the_fusion_map():
    points = FusionPointPrompts(4, 8, num_points=3)
    scores = torch.zeros(1, 1, 6, 8)
    scores[0, 0, 1, 1] = 5.0
    scores[0, 0, 4, 6] = 3.0
    scores[0, 0, 4, 5] = 4.0  # neighbour of (4, 6): suppresses it
    scores[0, 0, 2, 2] = 4.5  # neighbour of (1, 1): suppressed by it
    scores[0, 0, 0, 7] = 1.0
    assert points.select(scores).tolist() == [[1 * 8 + 1, 4 * 8 + 5, 0 * 8 + 7]]
    flat = torch.zeros(1, 1, 6, 8)  # one maximum: the best other cells fill up
    flat[0, 0, 3, 3] = 1.0
    flat[0, 0, 5, 0] = 0.5
    assert points.select(flat).tolist()[0][:2] == [3 * 8 + 3, 5 * 8 + 0]
    # the score comes from the fusion map: a spike in the scored channel becomes the first point
    from sam2.modeling.position_encoding import PositionEmbeddingRandom

    pe = PositionEmbeddingRandom(4)
    with torch.no_grad():
        points.score.weight.zero_()
        points.score.weight[0, 0] = 1.0
        points.score.bias.zero_()
    fusion = torch.randn(2, 4, 6, 8) * 0.1
    fusion[0, 0, 2, 5] = 10.0
    fusion[1, 0, 5, 1] = 10.0
    tokens, info = points(fusion, (24, 32), pe)
    assert tokens.shape == (2, 3, 8) and info["coords"].shape == (2, 3, 2)
    assert info["coords"][0, 0].tolist() == [(5 + 0.5) * 4, (2 + 0.5) * 4]  # (x, y) in input pixels
    assert info["coords"][1, 0].tolist() == [(1 + 0.5) * 4, (5 + 0.5) * 4]
    assert info["scores"][:, 0].tolist() == pytest.approx([10.0, 10.0])
    # the token is SAM's point encoding: PE of the coordinates + point embedding + gated content
    expected = pe.forward_with_coords(info["coords"], (24, 32)) + points.point_embed.weight
    assert torch.allclose(tokens, expected, atol=1e-6)  # content projection starts at zero


def test_point_prompts_reach_the_decoder(info):
    model = make(info).eval()
    rgb, th = pair()
    with torch.no_grad():
        out = model(rgb, th)
        fusion = out["fusion_mask"]
        scores = model.prompt_encoder.points.score(fusion)
        expected = model.prompt_encoder.points.select(scores)
        w = fusion.shape[-1]
        cells = (out["points"]["coords"] / model.lstg["rgb"].downsample - 0.5).round().long()
        assert torch.equal(cells[..., 1] * w + cells[..., 0], expected)
        assert out["points"]["coords"].shape == (1, 8, 2)
        model.prompt_encoder.points.point_embed.weight.add_(1.0)
        assert not torch.allclose(model(rgb, th)["logits"], out["logits"])
        # directly at the head: other sparse tokens, other logits; a wrong shape is refused
        d = model.image_encoder.neck.d_model
        maps = (torch.randn(1, d, 4, 6), torch.randn(1, d // 4, 8, 12), torch.randn(1, d // 8, 16, 24))
        dense = torch.zeros(1, d, 4, 6)
        tokens = torch.randn(1, 3, d)
        a = model.sam_head(*maps, dense=dense, sparse=tokens)
        b = model.sam_head(*maps, dense=dense, sparse=tokens * 2)
        assert not torch.allclose(a, b)
        assert torch.allclose(model.sam_head(*maps, dense=dense), model.sam_head(*maps, dense=dense, sparse=None))
    with pytest.raises(ValueError, match="sparse prompt"):
        model.sam_head(*maps, dense=dense, sparse=torch.zeros(1, 3, d + 1))
    cfg = resolve_model_config(MICRO)
    cfg["prompt"]["points"] = 0
    none = make(info, cfg=cfg).eval()
    assert none.prompt_encoder.points is None
    with torch.no_grad():
        assert "points" not in none(rgb, th)


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
    for section, key, value, match in (
        ("lstg", "downsample", 3, "power of two"),
        ("lstg", "downsample", 32, "<= 16"),
        ("lstg", "rec_weight", -1.0, "weights must be >= 0"),
        ("lstg", "ema_decay", 1.5, "ema_decay"),
        ("lstg", "dead_code_threshold", -1.0, "dead_code_threshold"),
        ("lstg", "restart_from", "rgb", "restart_from"),
        ("prompt", "points", -1, "prompt.points"),
    ):
        bad = copy.deepcopy(cfg)
        bad[section][key] = value
        with pytest.raises(ValueError, match=match):
            build_model(bad, info)
    tiny = resolve_model_config("models/fusionsam_tiny.yaml")
    assert tiny["input_size"] == [480, 640] and tiny["encoder"]["freeze"] is True
    assert tiny["lstg"]["downsample"] == 4 and tiny["lstg"]["perceptual_weight"] == 0.0
    assert tiny["lstg"]["adversarial_weight"] == 0.0 and tiny["decoder"]["freeze_transformer"] is False
    assert tiny["prompt"] == {"encoder_input": True, "points": 8}
    assert tiny["lstg"]["standardize"] is True and tiny["lstg"]["restart_from"] == "underserved"
    assert tiny["fmp"]["shift"] is True and tiny["fmp"]["window"] == 8
    plain = copy.deepcopy(cfg)
    plain["lstg"].update(standardize=False, restart_from="batch")
    plain["fmp"]["shift"] = False
    model = build_model(plain, info)
    assert model.lstg.standardizers is None and model.lstg.quantizer.restart_from == "batch"
    assert model.fmp.shift == 0 and not any("standardizers" in k for k in model.state_dict())
    rec = {k: tiny["recipe"][k] for k in ("optimizer", "lr", "weight_decay", "poly_power", "loss")}
    assert rec == {"optimizer": "adam", "lr": 1.0e-4, "weight_decay": 1.0e-3, "poly_power": 0.0, "loss": "ce"}
    with pytest.raises(ValueError, match="encoder.checkpoint is not set"):
        build_model(tiny, load_dataset_info("mfnet"))


def test_a_config_written_before_the_shared_codebook_still_builds(info):
    """Checkpoint configs of older versions lack the codebook, prompt and recipe keys: defaults fill them."""
    import yaml

    from rgbt_seg_ros.resources import resolve_data_file

    raw = yaml.safe_load(resolve_data_file(MICRO).read_text())
    for key in ("ema_decay", "dead_code_threshold", "kmeans_iters"):
        raw["lstg"].pop(key)
    raw.pop("prompt")
    raw.pop("recipe")
    cfg = resolve_model_config(raw)
    assert cfg["prompt"]["points"] == 8 and cfg["lstg"]["ema_decay"] == 0.99
    model = build_model(cfg, info).eval()
    with torch.no_grad():
        assert model(*pair())["logits"].shape == (1, info.num_classes, 64, 96)


# ---------------------------------------------------------------- the shared backend contract


def _encoder_freeze(cfg: dict, path: str) -> None:
    cfg["encoder"].update(checkpoint=path, freeze=True)


FUSIONSAM_CASE = BackendCase(
    name="fusionsam",
    config="models/fusionsam_micro.yaml",
    trainable_prefixes=("lstg.", "fmp.", "prompt_encoder.", "sam_head.mask_decoder."),
    frozen_prefixes=(
        "image_encoder.trunk.",
        "image_encoder.neck.",
        "sam_head.no_mask_embed.",
        "sam_head.mask_decoder.iou_prediction_head.",
    ),
    thermal_param="lstg.thermal.encoder.0.weight",
    freeze_with_base=_encoder_freeze,
    # the zero-initialised projections of the fusion map: into the encoder's patch tokens, into the point tokens
    randomize=lambda model: randomize_named(model, ("prompt_encoder.image.proj.", "prompt_encoder.points.content.")),
    has_aux_losses=True,
    aux_only_param="lstg.rgb.decoder.0.weight",  # the reconstruction loss is all that reaches the VQ decoder
    tiny_config="models/fusionsam_tiny.yaml",
    # what SAM2's mask decoder receives: the fusion enters the encoder through a projection that starts at zero
    identity_kind="decoder",
    identity=decoder_inputs,
)


class TestFusionSamContract(BackendContract):
    case = FUSIONSAM_CASE
