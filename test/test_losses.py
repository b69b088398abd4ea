"""SARTM losses: OHEM cross-entropy (eq. 11), prototype distillation (eq. 12-14), the total (eq. 15)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from rgbt_seg_ros.training.losses import (
    PAPER_WEIGHTS,
    OhemCrossEntropy,
    PrototypeMemory,
    SartmLoss,
    class_prototypes,
    prototype_distillation_losses,
    term_gradient_norms,
)


def confident_logits(labels, num_classes, margin=10.0):
    """Logits that put ~all probability on the true class (ignored pixels: class 0)."""
    target = labels.clone()
    target[target == 255] = 0
    return F.one_hot(target, num_classes).permute(0, 3, 1, 2).float() * margin


# --------------------------------------------------------------------------- OHEM


def test_ohem_equals_plain_cross_entropy_when_every_pixel_is_hard():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 16, 16))
    labels[0, :3] = 255
    logits = torch.randn(2, 4, 16, 16) * 0.1  # p(true) ~ 0.25 < 0.7 everywhere
    ohem = OhemCrossEntropy()
    expected = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(ohem(logits, labels), expected, atol=1e-6)
    _, kept = ohem.select(logits, labels)
    assert int(kept.sum()) == int((labels != 255).sum())


def test_ohem_keeps_at_least_a_sixteenth_of_the_valid_pixels_the_hardest_ones():
    labels = torch.randint(0, 3, (1, 32, 32), generator=torch.Generator().manual_seed(1))
    labels[0, :, :2] = 255
    logits = confident_logits(labels, 3)
    # Three hard pixels only, of increasing difficulty.
    for k, (y, x) in enumerate([(5, 5), (6, 6), (7, 7)]):
        logits[0, :, y, x] = 0.0
        logits[0, (labels[0, y, x] + 1) % 3, y, x] = 2.0 + k
    ohem = OhemCrossEntropy(thresh=0.7, min_kept_fraction=1 / 16)
    ce, kept = ohem.select(logits, labels)
    n_valid = int((labels != 255).sum())
    assert int(kept.sum()) == n_valid // 16 > 3
    assert kept[0, 5, 5] and kept[0, 6, 6] and kept[0, 7, 7]
    assert not kept[labels == 255].any()
    assert ce[kept].min() >= ce[(labels != 255) & ~kept].max()  # the hardest, not any
    assert torch.allclose(ohem(logits, labels), ce[kept].mean())
    # More hard pixels than n_min: exactly the hard ones are kept.
    logits_many = logits.clone()
    logits_many[0, :, 10:20, :] = 0.0
    _, kept_many = ohem.select(logits_many, labels)
    probs = logits_many.softmax(1).gather(1, labels.clamp(max=2)[:, None])[:, 0]
    assert torch.equal(kept_many, (probs < 0.7) & (labels != 255))


def test_ohem_ignores_255_and_upsamples_logits_to_label_size():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4] = 255
    logits = torch.zeros(1, 2, 8, 8)
    base = OhemCrossEntropy()(logits, labels)
    logits[0, 1, :4] = 50.0  # confidently wrong, but only on ignored pixels
    assert torch.allclose(OhemCrossEntropy()(logits, labels), base)
    everything_ignored = torch.full((1, 8, 8), 255)
    z = torch.zeros(1, 2, 8, 8, requires_grad=True)
    loss = OhemCrossEntropy()(z, everything_ignored)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    small = torch.zeros(1, 3, 4, 4)
    assert OhemCrossEntropy()(small, torch.ones(1, 16, 16, dtype=torch.long)).item() == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="outside the model's 3 classes"):
        OhemCrossEntropy()(small, torch.full((1, 4, 4), 7))


# --------------------------------------------------------------------------- prototypes


def test_class_prototypes_are_masked_averages_at_feature_resolution():
    features = torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2)  # D=2, 2x2 cells
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 255, 255], [0, 1, 255, 255]]])
    protos, present = class_prototypes(features, labels, num_classes=3)
    assert present.tolist() == [True, True, False]
    # Cell weights: class 0 -> cell (0,0): 1, cell (1,0): 0.5; class 1 -> cell (0,1): 1, cell (1,0): 0.5.
    f = features[0].reshape(2, 4).t()  # cells in order (0,0), (0,1), (1,0), (1,1)
    expected0 = (1.0 * f[0] + 0.5 * f[2]) / 1.5
    expected1 = (1.0 * f[1] + 0.5 * f[2]) / 1.5
    assert torch.allclose(protos[0], expected0) and torch.allclose(protos[1], expected1)
    assert torch.all(protos[2] == 0)


def features_from(labels, table, size=(8, 8)):
    """Features whose every pixel holds ``table[class]``: the prototypes are exactly ``table``."""
    lab = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return table[lab].permute(0, 3, 1, 2).contiguous()


def test_semantic_distillation_is_zero_when_relations_match_and_grows_when_they_differ():
    torch.manual_seed(0)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, :, 4:8], labels[:, :, 8:12], labels[:, :, 12:] = 1, 2, 3
    text = F.normalize(torch.randn(5, 12), dim=-1)  # class 4 absent from the batch
    # Prototypes = a rotation of the text embeddings (another width even): same cosine relations.
    q, _ = torch.linalg.qr(torch.randn(20, 20))
    matching = features_from(labels, (torch.cat([text, torch.zeros(5, 8)], 1) @ q) * 3.0)
    res = prototype_distillation_losses(matching, labels, text)
    assert res["present"].tolist() == [0, 1, 2, 3]
    assert res["l_se"].item() < 1e-6
    near = features_from(labels, torch.cat([text, torch.zeros(5, 8)], 1) + 0.3 * torch.randn(5, 20))
    far = features_from(labels, torch.randn(5, 20))
    l_near = prototype_distillation_losses(near, labels, text)["l_se"].item()
    l_far = prototype_distillation_losses(far, labels, text)["l_se"].item()
    assert 0 < l_near < l_far


def test_gradients_flow_to_the_features():
    torch.manual_seed(1)
    labels = torch.randint(0, 4, (2, 32, 32))
    feats = torch.randn(2, 16, 8, 8, requires_grad=True)
    f_rgb = torch.randn(2, 16, 8, 8, requires_grad=True)
    f_th = torch.randn(2, 16, 8, 8, requires_grad=True)
    text = torch.randn(4, 10)
    res = prototype_distillation_losses(feats, labels, text, features_rgb=f_rgb, features_thermal=f_th)
    (res["l_se"] + res["l_cr"]).backward()
    for t in (feats, f_rgb, f_th):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_cross_modal_term_compares_the_modalities_class_by_class():
    torch.manual_seed(2)
    labels = torch.randint(0, 3, (1, 16, 16))
    f = torch.randn(1, 8, 4, 4)
    same = prototype_distillation_losses(f, labels, None, num_classes=3, features_rgb=f, features_thermal=f.clone())
    # 8 channels: values are (8 / 256)^2 of the plain per-entry mean (L_cr is referenced to 256 channels)
    assert same["cr_mode"] == "cross_modal" and same["l_cr"].item() < 1e-10 and same["l_se"] is None
    other = prototype_distillation_losses(
        f, labels, None, num_classes=3, features_rgb=f, features_thermal=torch.randn(1, 8, 4, 4)
    )
    assert other["l_cr"].item() > 1e-7


def test_memory_term_compares_batch_prototypes_with_their_running_average():
    torch.manual_seed(3)
    labels = torch.randint(0, 3, (1, 16, 16))
    f = torch.randn(1, 8, 4, 4)
    memory = PrototypeMemory(momentum=0.9)
    first = prototype_distillation_losses(f, labels, None, num_classes=3, memory=memory)
    assert first["cr_mode"] == "memory" and first["l_cr"].item() == 0.0  # nothing remembered yet
    again = prototype_distillation_losses(f, labels, None, num_classes=3, memory=memory)
    assert again["l_cr"].item() < 1e-10
    moved = prototype_distillation_losses(f + 3 * torch.randn(1, 8, 4, 4), labels, None, num_classes=3, memory=memory)
    assert moved["l_cr"].item() > 1e-7
    assert memory.seen.tolist() == [True, True, True]


# --------------------------------------------------------------------------- SartmLoss


def model_output(labels, num_classes=4, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    b, h, w = labels.shape
    out = {
        "s0": torch.randn(b, num_classes, h // 4, w // 4, generator=g, requires_grad=True),
        "s1": torch.randn(b, num_classes, h // 4, w // 4, generator=g, requires_grad=True),
        "features": {
            "sfm": torch.randn(b, 16, h // 16, w // 16, generator=g, requires_grad=True),
            "ffp": torch.randn(b, 4, h // 4, w // 4, generator=g),
        },
        "text_embeddings": torch.randn(num_classes, 10, generator=g),
    }
    out.update(extra)
    return out


def test_sartm_loss_is_the_weighted_sum_of_its_terms():
    labels = torch.randint(0, 4, (2, 64, 64), generator=torch.Generator().manual_seed(4))
    out = model_output(labels)
    ohem = OhemCrossEntropy()
    ce0, ce1 = ohem(out["s0"], labels).item(), ohem(out["s1"], labels).item()
    feats = out["features"]["sfm"]
    f_rgb, f_th = torch.randn_like(feats), torch.randn_like(feats)
    out.update(features_rgb=f_rgb, features_thermal=f_th)
    ref = prototype_distillation_losses(
        feats, labels, out["text_embeddings"], features_rgb=f_rgb, features_thermal=f_th
    )
    weights = (1.0, 0.5, 200.0, 3.0)
    total, parts = SartmLoss(weights=weights)(out, labels)
    assert parts["ce_s0"] == pytest.approx(ce0) and parts["ce_s1"] == pytest.approx(ce1)
    assert parts["l_cr"] == pytest.approx(ref["l_cr"].item()) and parts["l_se"] == pytest.approx(ref["l_se"].item())
    expected = ce0 + 0.5 * ce1 + 200.0 * parts["l_cr"] + 3.0 * parts["l_se"]
    assert total.item() == pytest.approx(expected, rel=1e-5) and parts["total"] == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert out["features"]["sfm"].grad.abs().sum() > 0 and out["s1"].grad.abs().sum() > 0
    assert SartmLoss().weights == (1.0, 0.008, 10000.0, 100.0)  # the paper's Table VII


def test_sartm_loss_skips_missing_terms_with_one_warning_each():
    labels = torch.randint(0, 4, (1, 64, 64), generator=torch.Generator().manual_seed(5))
    out = model_output(labels)
    del out["s1"], out["text_embeddings"]
    loss = SartmLoss()
    with pytest.warns(RuntimeWarning) as record:
        total, parts = loss(out, labels)
    messages = " | ".join(str(r.message) for r in record)
    assert "no 's1'" in messages and "L_se is skipped" in messages and "prototype memory" in messages
    assert set(parts) == {"ce_s0", "l_cr", "total"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        loss(out, labels)
    # A backend with only logits (and no features) trains on its logits; the trainer zeroes the
    # weights of the terms it lacks (models.backend_loss_terms), so nothing warns.
    only_logits = {"logits": torch.randn(1, 4, 64, 64, requires_grad=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total, parts = SartmLoss(weights=(1.0, 0.0, 0.0, 0.0))(only_logits, labels)
    assert set(parts) == {"ce_s0", "total"} and total.requires_grad
    assert float(total) == pytest.approx(parts["ce_s0"])


def test_sartm_loss_adds_backend_aux_losses_as_they_are():
    labels = torch.randint(0, 4, (1, 32, 32), generator=torch.Generator().manual_seed(7))
    logits = torch.randn(1, 4, 32, 32, requires_grad=True)
    rec = (logits**2).mean() * 0.5
    out = {"logits": logits, "aux_losses": {"lstg_rec": rec, "lstg_commit": torch.tensor(0.25)}}
    total, parts = SartmLoss(weights=(1.0, 0.0, 0.0, 0.0))(out, labels)
    assert set(parts) == {"ce_s0", "lstg_rec", "lstg_commit", "total"}
    assert float(total.detach()) == pytest.approx(parts["ce_s0"] + float(rec.detach()) + 0.25, rel=1e-6)
    total.backward()
    assert logits.grad is not None
    ce_only = SartmLoss(weights=(1.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="'ce_s1' clashes"):
        ce_only({"logits": logits, "aux_losses": {"ce_s1": rec}}, labels)
    with pytest.raises(ValueError, match="'bad' must be a scalar"):
        ce_only({"logits": logits, "aux_losses": {"bad": torch.ones(3)}}, labels)


def test_sartm_loss_zero_weights_skip_silently_and_bad_settings_are_rejected():
    labels = torch.randint(0, 4, (1, 64, 64), generator=torch.Generator().manual_seed(6))
    out = model_output(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total, parts = SartmLoss(weights=(1.0, 0.0, 0.0, 0.0))(out, labels)
    assert set(parts) == {"ce_s0", "total"}
    with pytest.raises(ValueError, match="levels \\['ffp', 'sfm'\\]"):
        SartmLoss(feature_level="ifp")(out, labels)
    with pytest.raises(ValueError, match="4 finite values"):
        SartmLoss(weights=(1.0, 2.0, 3.0))


def test_enet_class_weights_by_hand():
    from rgbt_seg_ros.training.losses import enet_class_weights

    w = enet_class_weights([900, 100, 0])  # shares 0.9, 0.1, 0
    assert w == pytest.approx([1 / math.log(1.92), 1 / math.log(1.12), 1 / math.log(1.02)], rel=1e-5)
    assert w[0] < w[1] < w[2] <= 1 / math.log(1.02) + 1e-5  # rarer -> heavier, bounded
    with pytest.raises(ValueError, match="no labelled pixels"):
        enet_class_weights([0, 0])


def test_class_weighted_ohem_is_the_weighted_mean_over_kept_pixels():
    logits = torch.zeros(1, 2, 1, 4)  # uniform: CE log 2
    labels = torch.tensor([[[0, 0, 1, 255]]])
    ohem = OhemCrossEntropy(thresh=1.0, class_weights=torch.tensor([1.0, 3.0]))  # thresh 1: every pixel is hard
    logits[0, 0, 0, 0] = 1.0  # pixel 0 (class 0) easier: CE = log(1 + e^-1)
    ce0 = math.log(1 + math.exp(-1.0))
    expected = (ce0 + math.log(2) + 3 * math.log(2)) / 5
    assert float(ohem(logits, labels)) == pytest.approx(expected, rel=1e-6)
    assert float(OhemCrossEntropy(thresh=1.0)(logits, labels)) == pytest.approx((ce0 + 2 * math.log(2)) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="finite values > 0"):
        OhemCrossEntropy(class_weights=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="3 class weights for a model with 2"):
        OhemCrossEntropy(class_weights=torch.tensor([1.0, 1.0, 1.0]))(logits, labels)


# --------------------------------------------------------------------------- gradient shares at initialisation


def _encoder_gradient_shares(neck_width: int) -> dict[str, float]:
    """Norm of each weighted term's gradient on the micro SARTM's SAM2 encoder (trunk, neck, LoRA) at
    initialisation, divided by CE(S0)'s: one fixed batch of 4 synthetic scenes at 96x128."""
    from rgbt_seg_ros.data.datasets import SyntheticDataset
    from rgbt_seg_ros.models import build_model, resolve_model_config
    from rgbt_seg_ros.models.classes import load_dataset_info
    from rgbt_seg_ros.models.preprocessing import normalize_batch

    info = load_dataset_info("synthetic")
    cfg = resolve_model_config("models/sartm_micro.yaml")
    cfg["encoder"]["neck"]["d_model"] = neck_width
    text = F.normalize(torch.randn(info.num_classes, 384, generator=torch.Generator().manual_seed(0)), dim=1)
    torch.manual_seed(0)
    model = build_model(cfg, info, text).train()
    ds = SyntheticDataset(info, "train", count=4, size=(96, 128))
    items = [ds[i] for i in range(4)]
    batch = {k: torch.stack([torch.from_numpy(it[k]) for it in items]) for k in ("rgb", "thermal", "valid", "labels")}
    rgb, th = normalize_batch(cfg, batch["rgb"], batch["thermal"])
    params = [p for n, p in model.named_parameters() if n.startswith("image_encoder") and p.requires_grad]
    loss = SartmLoss(weights=PAPER_WEIGHTS)
    loss(model(rgb, th * batch["valid"], batch["valid"]), batch["labels"])
    assert set(loss.last_weighted) == {"ce_s0", "ce_s1", "l_cr", "l_se"}
    norms = term_gradient_norms(loss.last_weighted, params)
    return {k: v / norms["ce_s0"] for k, v in norms.items()}


def test_gradient_share_of_each_weighted_term_at_initialisation():
    """The proportions losses.py documents, with the paper's weights (1, 0.008, 1e4, 100) on a random
    micro SARTM (fusion.identity_init: thermal reaches the fused map only once the zero gates move):
    S1's CE is a small correction (w1); L_cr, referenced to the paper's 256-channel neck, stays within
    a few times CE(S0) at any neck width (the plain mean gave ~150x between the widths); L_se is the
    largest term at initialisation, where CE reaches the encoder only through a random decoder and the
    RGB path: the paper preset lets the language terms dominate, which the sweep measures."""
    micro = _encoder_gradient_shares(32)
    wide = _encoder_gradient_shares(256)
    for shares in (micro, wide):
        assert shares["ce_s1"] < 0.1, shares
        assert 0.5 < shares["l_cr"] < 10.0, shares
        assert 1.5 < shares["l_se"] < 30.0, shares
    assert micro["l_cr"] / wide["l_cr"] < 10.0, (micro, wide)


# ---------------------------------------------------------------- presets, warm-up, gradient norms
def test_loss_presets_and_explicit_weights():
    from rgbt_seg_ros.training.losses import DEFAULT_LOSS_PRESET, LOSS_PRESETS
    from rgbt_seg_ros.training.train_config import TrainConfigError, resolve_train_config

    base = {"dataset": "synthetic"}
    default = resolve_train_config(base)["loss"]
    assert default["preset"] == DEFAULT_LOSS_PRESET == "calibrated"
    assert default["weights"] == list(LOSS_PRESETS["calibrated"]["weights"])
    assert default["language_warmup"] == LOSS_PRESETS["calibrated"]["language_warmup"]
    paper = resolve_train_config(base | {"loss": {"preset": "paper"}})["loss"]
    assert tuple(paper["weights"]) == PAPER_WEIGHTS and paper["language_warmup"] == 0.0
    assert resolve_train_config(base | {"loss": {"preset": "authors_code"}})["loss"]["weights"] == [1.0] * 4
    # explicit weights are used as given, without the preset's warm-up unless it is set too
    explicit = resolve_train_config(base | {"loss": {"weights": [1, 0, 0, 0]}})["loss"]
    assert explicit["weights"] == [1, 0, 0, 0] and explicit["language_warmup"] == 0.0
    both = resolve_train_config(base | {"loss": {"weights": [1, 1, 1, 1], "language_warmup": 0.5}})["loss"]
    assert both["language_warmup"] == 0.5
    with pytest.raises(TrainConfigError, match="loss.preset must be one of paper, authors_code, calibrated"):
        resolve_train_config(base | {"loss": {"preset": "table7"}})
    with pytest.raises(TrainConfigError, match=r"language_warmup must be a fraction of the run in \[0, 1\]"):
        resolve_train_config(base | {"loss": {"language_warmup": 2}})


def test_language_ramp_is_linear_over_the_warmup():
    from rgbt_seg_ros.training.losses import language_ramp

    assert [language_ramp(s, 100, 0.2) for s in (0, 5, 10, 20, 50)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert language_ramp(0, 100, 0.0) == 1.0


def _trainer_rows(tmp_path, loss: dict, steps: int = 4) -> list[dict]:
    import json

    from rgbt_seg_ros.training.trainer import Trainer

    cfg = {
        "dataset": "synthetic",
        "dataset_options": {"count": 8, "size": [96, 128]},
        "val_split": None,
        "max_steps": steps,
        "batch_size": 4,
        "log_every": 1,
        "progress": False,
        "tensorboard": False,
        "loss": loss,
        "model": {"input_size": [96, 128]},
    }
    tr = Trainer("models/sartm_micro.yaml", cfg, tmp_path)
    tr.fit()
    tr.close()
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_thread")
def test_trainer_logs_each_weighted_terms_gradient_norm(tmp_path):
    """A user sees a dominating term in the first rows: each weighted term's gradient norm on the trainable
    parameters. With the default preset's weights every term is within 10x of CE(S0) at the start (warm-up
    off, the weights at full strength); with the paper's, L_se's is several times CE's."""
    from rgbt_seg_ros.training.losses import LOSS_PRESETS

    shares = {}
    for name, loss in (("calibrated", {"language_warmup": 0.0}), ("paper", {"preset": "paper"})):
        rows = _trainer_rows(tmp_path / name, loss, steps=1)
        first = rows[0]
        weighted = [t for t, w in zip(("ce_s0", "ce_s1", "l_cr", "l_se"), LOSS_PRESETS[name]["weights"]) if w > 0]
        assert {f"gradnorm_{t}" for t in weighted} == {k for k in first if k.startswith("gradnorm_")}
        shares[name] = {
            k[len("gradnorm_") :]: v / first["gradnorm_ce_s0"] for k, v in first.items() if "gradnorm_" in k
        }
    assert all(0 < r <= 10.0 for r in shares["calibrated"].values()), shares
    assert shares["paper"]["l_se"] > 2.0, shares


@pytest.mark.usefixtures("one_thread")
def test_the_language_warmup_ramps_w2_and_w3(tmp_path):
    weights = [1.0, 1.0, 10000.0, 10.0]
    rows = _trainer_rows(tmp_path, {"weights": weights, "language_warmup": 0.5}, steps=4)
    assert [r["language_factor"] for r in rows] == [0.0, 0.5, 1.0, 1.0]
    w = dict(zip(("ce_s0", "ce_s1", "l_cr", "l_se"), weights))
    for r in rows:
        f = r["language_factor"]
        language = r["l_cr"] * w["l_cr"] + r["l_se"] * w["l_se"]
        expected = r["ce_s0"] * w["ce_s0"] + r["ce_s1"] * w["ce_s1"] + f * language
        assert r["total"] == pytest.approx(expected, rel=1e-5)
    assert rows[0]["gradnorm_l_se"] == 0.0 and rows[0]["gradnorm_l_cr"] == 0.0  # nothing from them at step 0
    assert rows[-1]["gradnorm_l_se"] > 0 and rows[-1]["gradnorm_l_cr"] > 0


def test_gradient_norm_of_a_term_that_does_not_reach_the_parameters_is_zero():
    reached, missed = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    norms = term_gradient_norms({"missed": (missed * 2).sum(), "reached": (reached * 3).sum()}, [reached])
    assert norms == {"missed": 0.0, "reached": pytest.approx(math.sqrt(18.0))}
