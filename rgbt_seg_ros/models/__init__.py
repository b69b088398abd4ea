"""Everything inference needs, standing on its own: the backends (nn.Modules) and the registry that
builds them by name, the checkpoint format, class lists and class sets, the text teacher and the
preprocessing the Segmenter and the trainer share (docs/architecture.md).

``build_model(cfg, dataset_info, text_embeddings=None)`` dispatches on ``cfg["backend"]``;
importing this package registers the built-in backends.
"""

from .cpal import CPAL  # noqa: F401  (registers the "cpal" backend)
from .fusionsam import FusionSAM  # noqa: F401  (registers the "fusionsam" backend)
from .registry import (
    LOSS_TERMS,
    available_backends,
    backend_loss_terms,
    build_model,
    dataset_info_for,
    load_model_config,
    register_backend,
    resolve_model_config,
)
from .sartm import SARTM
from .segrgbx import SegRGBX  # noqa: F401  (registers the "segrgbx" backend)

__all__ = [
    "LOSS_TERMS",
    "SARTM",
    "available_backends",
    "backend_loss_terms",
    "build_model",
    "dataset_info_for",
    "load_model_config",
    "register_backend",
    "resolve_model_config",
]
