"""The training loop behind ``rgbt-seg train``: seeded, exactly resumable, single process or DDP.

A run is described by two dicts: the **model config** (``models/*.yaml``, resolved by
:func:`rgbt_seg_ros.models.resolve_model_config`) and the **train config** (``TRAIN_DEFAULTS``
in :mod:`.train_config`; from ``--train-config FILE.yaml`` and the command-line flags). The train config's
``model:`` section overrides model-config keys (e.g. ``{output: {combine: s0}}``), so one model
YAML serves several experiments.

What one step does: a batch of augmented items (:mod:`.transforms`, each item's randomness drawn
from ``(seed, epoch, index)``, so workers, ranks and resumption never change it) is normalised
with :func:`rgbt_seg_ros.models.preprocessing.normalize_batch` (the Segmenter's own function), run through
the model, scored with :class:`.losses.SartmLoss` (eq. 15) and optimised with the backend's
**recipe** (the ``recipe`` section of its model config: optimizer AdamW or Adam, lr, weight decay,
poly power, OHEM or plain cross-entropy; SARTM: AdamW 1e-4, 0.01, poly 0.9, OHEM). A train-config
key that is set (``optimizer``, ``lr``, ``weight_decay``, ``poly_power``, ``loss.kind``) wins over the
recipe; :func:`apply_recipe` merges them and ``Trainer.recipe_line`` says what was used. No weight
decay on biases and 1-D parameters (as the papers' code); the learning rate follows a linear
warm-up then the poly decay (:class:`WarmupPolySchedule`; power 0 = constant).

Outputs under ``OUT``::

    OUT/last/    checkpoint (model.safetensors + config.yaml, the format of checkpoint.py)
                 + train_state.pt (optimizer, RNG states, step, best mIoU; torch.load(weights_only=True))
                 + train_config.yaml
    OUT/best/    checkpoint with the best validation mIoU (+ metrics.json)
    OUT/metrics.jsonl          one JSON object per logged step and per validation
    OUT/model_config.yaml      the resolved model config (with the SAM2 path), used by --resume
    OUT/train_config.yaml      the train config
    OUT/tensorboard/           scalars, when the ``tensorboard`` package is installed

Checkpoint directories are written to a temporary directory and renamed into place, so a crash
while saving leaves the previous ``last/`` intact.

Exact resumption: ``last/`` holds the trained tensors, the AdamW state, the step and epoch, the
python / numpy / torch (and CUDA) RNG states and the prototype memory of the loss. Resuming
from a mid-epoch stop skips the batches the epoch had already served (the epoch's order is a
function of the seed and the epoch). On CPU, N steps in one go and N/2 + resume + N/2 give
bit-identical weights (``test/test_trainer.py``), also for a backend that draws from torch's global
RNG while training (see ``Trainer._epoch_batches``) and for joint runs (``test/test_class_sets.py``).

Several datasets (train config ``datasets``, a backend with class sets such as segrgbx): each batch
comes from one dataset (:mod:`.joint`), the model is switched to that dataset's class set and the
batch is scored in that dataset's own label space by that set's loss; validation and the checkpoint's
``classes`` are the first (primary) dataset's, the others travel in the model config's ``class_sets``
(docs/class_sets.md). The train config's keys and checks live in :mod:`.train_config`.

Distributed: started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the
environment) the trainer joins a process group (``nccl`` on CUDA, ``gloo`` on CPU), wraps the
model in DistributedDataParallel and the data in a DistributedSampler; ``batch_size`` is per
process; validation is sharded and the confusion matrices summed; only rank 0 writes files.

Where the pieces are (``Trainer`` combines them; every name is re-exported here):

- :mod:`.run_setup` -- the recipe (:func:`apply_recipe`), :class:`WarmupPolySchedule`, :func:`param_groups`,
  seeding, :func:`init_distributed`, and ``RunSetupMixin``: the construction steps ``Trainer.__init__`` runs.
- :mod:`.train_data` -- :class:`AugmentedDataset`, :class:`EpochSampler` and the train config's dataset helpers.
- :mod:`.loop` -- ``TrainingLoopMixin``: ``train_step`` (AMP, clipping), the pretraining stage, ``fit`` and the
  logging of scalars (``metrics.jsonl``, TensorBoard).
- :mod:`.validation` -- ``ValidationMixin``: ``validate``, best-mIoU tracking, ``last/`` and ``best/``
  checkpoints (atomic writes) and exact resumption; the RNG state helpers.
- :mod:`.train_config` -- the train config's keys and checks.
"""

from __future__ import annotations

from pathlib import Path

import torch

# re-exported: the names other modules and the tests import from here
from .loop import (  # noqa: F401
    CODEBOOK_STATS,
    METRICS_FILE,
    TrainingLoopMixin,
    _peak_rss_mb,
    tensorboard_scalars,
)
from .run_setup import (  # noqa: F401
    FALLBACK_RECIPE,
    RECIPE_KEYS,
    DistInfo,
    RunSetupMixin,
    WarmupPolySchedule,
    apply_recipe,
    describe_recipe,
    init_distributed,
    out_recipe,
    param_groups,
    seed_everything,
)
from .train_config import (  # noqa: F401
    DATASET_ENTRY_DEFAULTS,
    TRAIN_DEFAULTS,
    TrainConfigError,
    _merge,
    resolve_train_config,
)
from .train_data import (  # noqa: F401
    _FITTED_ITEMS,
    AugmentedDataset,
    EpochSampler,
    _compact,
    _dataset,
    _expand,
    _worker_init,
    dataset_entries,
    dataset_info_for_training,
)
from .validation import (  # noqa: F401
    MODEL_CONFIG_FILE,
    TRAIN_CONFIG_FILE,
    TRAIN_STATE_FILE,
    ValidationMixin,
    _atomic_dir_write,
    _json_metrics,
    _nan_to_none,
    find_last,
    rng_state,
    set_rng_state,
)


class Trainer(RunSetupMixin, TrainingLoopMixin, ValidationMixin):
    """Train one model; see the module docstring.

    ``model_config``: path or dict (a model YAML); ``train_config``: dict over ``TRAIN_DEFAULTS``;
    ``text_embeddings``: class-name embeddings (default: computed by the text teacher when the
    model uses language guidance); ``resume``: continue from ``out_dir/last``.
    """

    def __init__(
        self,
        model_config: str | Path | dict,
        train_config: dict,
        out_dir: str | Path,
        text_embeddings: torch.Tensor | None = None,
        resume: bool = False,
    ) -> None:
        self.cfg = resolve_train_config(train_config)
        self.out = Path(out_dir).expanduser()
        self.dist = init_distributed(str(self.cfg["device"]))
        self.device = self._device()
        self._resolve_configs(model_config)
        self._build_model(text_embeddings)
        base = self._build_data()
        self._build_schedule()
        self._build_loss_and_optimizer(base)
        self.step = 0
        self.pretrained = False  # the backend's pretraining stage has run (or there is none)
        self.best_miou = -1.0
        self.history: list[dict] = []
        self.seen_indices: list[int] = []  # training item indices this process consumed (tests, DDP checks)
        if resume:
            self._resume()
        self._wrap_distributed()
        self._open_outputs()
