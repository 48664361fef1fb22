"""Magnitude pruning: zero the weights of smallest |w|, per layer or across every selected layer.

magnitude          per layer (one comparison group per weight matrix), or N:M
magnitude_global   one threshold across all the layers the rule selects (a whole-model method:
                   the per-layer shape sees one layer at a time); unstructured only
"""

import numpy as np

from reslm.compress.prune import common
from reslm.compress.registry import Dense, register
from reslm.compress.targets import target_at


@register(
  "magnitude",
  stage="prune",
  defaults=common.SPARSITY_DEFAULTS,
  checks=common.SPARSITY_CHECKS,
  validate=common.validate_sparsity,
)
def _magnitude(w_kn, x_mk, settings):
  """Prunes the smallest |w| of the layer (exact count), or to N:M along the inputs."""
  del x_mk
  return Dense(w_kn * common.mask_for(abs(w_kn), settings, per_column=False))


def global_masks(weights: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
  """Keep-masks pruning exactly round(sparsity * total) of the smallest |w| across `weights`."""
  flat = np.concatenate([np.abs(w).reshape(-1) for w in weights])
  count = common.prune_count(flat.size, sparsity)
  keep = np.ones(flat.size, bool)
  keep[np.argsort(flat, kind="stable")[:count]] = False
  out, start = [], 0
  for w in weights:
    out.append(keep[start : start + w.size].reshape(w.shape))
    start += w.size
  return out


@register(
  "magnitude_global",
  stage="prune",
  defaults={"sparsity": 0.5},
  checks={"sparsity": common.SPARSITY_CHECKS["sparsity"]},
  per_layer=False,
)
def _magnitude_global(model, targets, calibration, settings):
  """One |w| threshold for every layer (and stacked slice) the rule selects, applied in place."""
  del calibration
  current = [target_at(model, t.path) for t in targets]  # A previous stage may have changed them.
  kernels = [np.asarray(t.module.kernel[...], np.float32) for t in current]
  for t, w, keep in zip(current, kernels, global_masks(kernels, settings["sparsity"]), strict=True):
    t.module.kernel[...] = (w * keep).astype(t.module.kernel.dtype)
  return []
