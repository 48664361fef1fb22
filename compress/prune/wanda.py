"""Wanda (Sun et al., 2024): prune by |W| · ‖X‖₂, no weight update.

The score of weight w[k, n] is |w[k, n]| times the L2 norm of input feature k over the calibration
tokens, so a small weight on an outlier input feature survives. Weights compete per output (each
column of w [K, N] prunes the same fraction of its K inputs), as in the paper; N:M groups run along
the inputs of each output as well.
"""

import jax.numpy as jnp

from reslm.compress.prune import common
from reslm.compress.registry import Dense, register


def scores(w_kn, x_mk):
  """|W| · ‖X_k‖₂, float32 [K, N]."""
  x = x_mk.astype(jnp.float32)
  norm_k = jnp.sqrt(jnp.sum(x * x, axis=0))  # [K]
  return jnp.abs(w_kn) * norm_k[:, None]


@register(
  "wanda",
  stage="prune",
  defaults=common.SPARSITY_DEFAULTS,
  checks=common.SPARSITY_CHECKS,
  needs_calibration=True,
  validate=common.validate_sparsity,
)
def _wanda(w_kn, x_mk, settings):
  """Prunes round(sparsity · K) inputs per output by |W|·‖X‖₂, or to N:M along the inputs."""
  return Dense(w_kn * common.mask_for(scores(w_kn, x_mk), settings, per_column=True))
