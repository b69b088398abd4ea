"""MA-CLIP pretraining (SegRGB-X section III-B): captions from labels, contrastive image-text loss.

The paper captions RGB images with LLaMA-Adapter and aligns CLIP's image embeddings of both modalities
with the caption's text embedding (eq. 1, ``L = contrastive({S^t, S^t}, {S^r, S^m})``), training only
the LoRA of the pair's modality. Offline there is no captioning model, so :func:`caption` writes the
caption from what the dataset knows about the image: the classes present with an instance count
(connected regions of each label), and the condition (day/night/fog/glare for the synthetic set, the
D/N suffix of MFNet names), e.g. "a scene at night with two people, a car and a road". The captions are
embedded by MA-CLIP's own text side (``model.ma_clip.embed_captions``): CLIP's frozen text encoder when
``ma_clip.clip_dir`` names a local CLIP, the offline MiniLM for the Hiera stand-in.

The loss is CLIP's symmetric cross-entropy over the 2B image embeddings ``[S^r; S^m]`` and the
captions repeated once; two images whose captions are equal are both counted as matches (soft
targets), so duplicate captions in a batch, the weakness Table IX of the paper points out, do not push
equal descriptions apart.

:func:`pretrain` is the trainer's first stage for a backend with ``pretrain_stage = "ma_clip"``: it
trains what ``model.ma_clip_parameters()`` names for ``ma_clip.pretrain.steps`` steps (train config
``pretrain_steps`` overrides), then freezes MA-CLIP again. Batches are drawn from the training set(s)
with their augmentation, by a generator seeded from the run's seed (the same on every DDP rank, so the
ranks stay identical without communication).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

#: Class names that are not mentioned in captions (the "nothing labelled here" class of each dataset).
BACKGROUND_NAMES = frozenset({"background", "unlabeled", "unlabelled", "void", "other"})
CONDITION_PHRASES = {"day": "in daylight", "night": "at night", "fog": "in fog", "glare": "in sun glare"}
NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
IRREGULAR_PLURALS = {"person": "people"}


def plural(name: str) -> str:
    if name in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[name]
    return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


def count_phrase(count: int, name: str) -> str:
    if count <= 1:
        return ("an " if name[:1] in "aeiou" else "a ") + name
    return f"{NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else 'many'} {plural(name)}"


def caption(
    labels: np.ndarray,
    class_names: tuple[str, ...] | list[str],
    condition: str = "",
    min_share: float = 0.002,
) -> str:
    """A one-sentence description of a labelled image: the classes covering at least ``min_share`` of
    it, each with its number of regions of at least that size, and the condition when known."""
    labels = np.asarray(labels)
    total = labels.size
    parts = []
    for cid, name in enumerate(class_names):
        if name.lower() in BACKGROUND_NAMES:
            continue
        mask = (labels == cid).astype(np.uint8)
        if int(mask.sum()) < min_share * total:
            continue
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        regions = int(np.sum(stats[1:, cv2.CC_STAT_AREA] >= min_share * total)) or 1
        parts.append(count_phrase(regions, name))
    scene = "a scene"
    if condition:
        scene += " " + CONDITION_PHRASES.get(condition, f"in {condition}")
    if not parts:
        return f"{scene} with nothing labelled"
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{scene} with {listed}"


def contrastive_loss(images: torch.Tensor, texts: torch.Tensor, captions: list[str], temperature: float):
    """Eq. 1: symmetric image-text cross-entropy, ``images`` (2B, D) = [S^r; S^m], ``texts`` (B, D) repeated
    once. Returns ``(loss, top-1 image-to-caption accuracy)``; equal captions are all counted as matches."""
    t = torch.cat([texts, texts]).to(images.dtype)
    names = list(captions) + list(captions)
    logits = images @ t.T / float(temperature)
    same = torch.tensor([[a == b for b in names] for a in names], dtype=images.dtype, device=images.device)
    targets = same / same.sum(dim=1, keepdim=True)
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    hit = same.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
    return loss, float(hit)


def pretrain(
    model: torch.nn.Module,
    sources: list[tuple[object, tuple[str, ...]]],
    model_cfg: dict,
    steps: int,
    seed: int,
    device: torch.device,
    log_every: int = 10,
    progress: bool = False,
    blank_thermal: bool = False,
) -> list[dict]:
    """Train MA-CLIP contrastively for ``steps`` steps; returns the logged rows (``type: pretrain``).

    ``sources``: (dataset, class names) pairs; each step draws one batch from one source, in turn.
    Items are dicts as the trainer's augmented datasets give them (``rgb``, ``thermal``, ``valid``,
    ``labels``, ``condition``). ``blank_thermal``: thermal 0 and invalid everywhere, as the segmentation
    steps of an RGB-only run (train config ``modalities: rgb``) see it.
    """
    from ..models.preprocessing import normalize_batch

    if getattr(model, "ma_clip", None) is None or steps <= 0:
        return []
    pc = model_cfg["ma_clip"]["pretrain"]
    params = model.ma_clip_parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=float(pc["lr"]), weight_decay=0.01)
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    batch_size = int(pc["batch_size"])
    was_training = model.training
    model.ma_clip.train()
    rows: list[dict] = []
    from tqdm import tqdm

    bar = tqdm(total=steps, disable=not progress, desc="MA-CLIP pretraining", leave=False)
    try:
        for step in range(1, steps + 1):
            dataset, names = sources[(step - 1) % len(sources)]
            idx = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
            batch = default_collate([dataset[i] for i in idx])
            caps = [caption(lab.numpy(), names, cond) for lab, cond in zip(batch["labels"], batch["condition"])]
            text = model.ma_clip.embed_captions(caps).to(device)
            valid = batch["valid"].to(device).float() * (0.0 if blank_thermal else 1.0)
            rgb, th = normalize_batch(model_cfg, batch["rgb"].to(device).float(), batch["thermal"].to(device).float())
            x3 = (th * valid).expand(-1, 3, -1, -1)
            _, s = model.ma_clip(rgb, x3, model.modality)
            loss, acc = contrastive_loss(s, text, caps, float(pc["temperature"]))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"MA-CLIP loss is {value} at step {step}: lower ma_clip.pretrain.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            if step % max(1, int(log_every)) == 0 or step == steps:
                rows.append(
                    {
                        "type": "pretrain",
                        "stage": "ma_clip",
                        "step": step,
                        "contrastive": value,
                        "caption_top1": acc,
                        "distinct_captions": len(set(caps)),
                    }
                )
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
        model.train(was_training)
    return rows
