"""Model merging: turn a pretrained model θ₀ and T fine-tuned experts θ₁…θ_T into one model θ_m.

Each method is a pure tensor function on one tensor name at a time, in its own module, registered with
its paper in :data:`METHODS`:

* ``average``: (1/T) Σ_t θ_t (:mod:`epmq.merge.average`);
* ``task_arithmetic``: θ₀ + λ Σ_t τ_t, τ_t = θ_t − θ₀ (:mod:`epmq.merge.task_arithmetic`);
* ``ties``: trim, elect sign, disjoint merge (:mod:`epmq.merge.ties`), global or per-tensor trimming;
* ``dare_task_arithmetic`` / ``dare_ties``: the same on DARE-sparsified task vectors
  (:mod:`epmq.merge.dare`; the ``dare_p`` hyperparameter of ``task_arithmetic`` and ``ties``).

:func:`merge_stream` runs whole (possibly lazy) state dicts through a method one tensor name at a time and
hands the merged tensors over as they come; :func:`merge_state_dicts` collects them into a dict, and
:func:`merge_files` streams .safetensors checkpoints into a .safetensors file (written atomically), holding
one key's tensors at a time, never a whole model.

A data-aware method (``needs_calibration``, e.g. RegMean) reads the train split's calibration batches through a
:class:`MergeData` handed to its ``prepare`` pass; each method is declared beside its tensor function.

Importing this package does not import torch: the functions import it when called.
"""

from epmq.merge.base import MergeData, MergeMethod
from epmq.merge.driver import (
    DEFAULT_EXCLUDE,
    MergeStream,
    lazy_state_dict,
    merge_files,
    merge_state_dicts,
    merge_stream,
    resolve_hparams,
)
from epmq.merge.registry import METHODS, get_method

__all__ = [
    "DEFAULT_EXCLUDE",
    "METHODS",
    "MergeData",
    "MergeMethod",
    "MergeStream",
    "get_method",
    "lazy_state_dict",
    "merge_files",
    "merge_state_dicts",
    "merge_stream",
    "resolve_hparams",
]
