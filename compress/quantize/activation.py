"""Methods that also quantize activations: SmoothQuant W8A8 and LLM.int8 outlier decomposition.

SmoothQuant (Xiao et al., 2023): activations have a few channels with large magnitudes, which
per-token int8 handles badly, while weights are easy to quantize. Per input channel j,

  s_j = max|X_j|^α / max|W_j|^(1 − α)      (α: migration strength, 0.5 by default)

moves difficulty from X to W exactly (X diag(1/s) · diag(s) W = XW); then both are int8: weights
per output channel (static), activations per token (dynamic, at run time), product in int32.

LLM.int8 (Dettmers et al., 2022): the input features whose calibration magnitude exceeds
`threshold` (emergent outlier features, systematic per dimension) stay in float with their weight
rows; every other feature goes through int8 x int8 with per-token / per-channel scales. The paper
keeps every such feature; here they are fixed from calibration (the layer has a static number of
float slots), as many as the most any layer of a stack has (`max_outliers=None`, the default), or
at most `max_outliers` (the largest by magnitude; the rest go through int8, and a warning names
the layer). The report gives each layer's `outliers_found` and `outliers_kept`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from reslm.compress.quantize import formats
from reslm.compress.quantize.layers import OutlierInt8Linear, W8A8Linear
from reslm.compress.registry import BOOL, Replacement, is_int, number, one_of, register


def smoothing_scales(x_mk: jax.Array, w_kn: jax.Array, alpha: float) -> jax.Array:
  """s [K] = max|X_j|^α / max|W_j|^(1−α); 1 where a channel is all zero."""
  ax = jnp.max(jnp.abs(x_mk.astype(jnp.float32)), axis=0)
  aw = jnp.max(jnp.abs(w_kn.astype(jnp.float32)), axis=1)
  ok = (ax > 0) & (aw > 0)
  s = jnp.where(ok, ax**alpha / jnp.where(ok, aw, 1.0) ** (1.0 - alpha), 1.0)
  return jnp.clip(s, 1e-5, 1e5)


@register(
  "smoothquant",
  stage="quantize",
  defaults={"alpha": 0.5, "smooth": True},
  checks={"alpha": number(0.0, 1.0), "smooth": BOOL},
  needs_calibration=True,
)
def _smoothquant(w_kn, x_mk, settings):
  """W8A8: smoothed int8 weights, int8 per-token activations, int32 accumulation."""
  w = w_kn.astype(jnp.float32)
  arrays = {}
  if settings["smooth"]:
    s = smoothing_scales(x_mk, w, settings["alpha"])
    w = w * s[:, None]
    arrays["input_scale"] = 1.0 / s
  w_q, w_scale = formats.quantize_int8(w)
  return Replacement(W8A8Linear, {"w_q": w_q, "w_scale": w_scale, **arrays}, {})


def outlier_features(x_mk: jax.Array, threshold: float, slots: int) -> jax.Array:
  """Up to `slots` input features with max |x| > threshold (largest first), sorted; K = unused."""
  k = x_mk.shape[1]
  amax = jnp.max(jnp.abs(x_mk.astype(jnp.float32)), axis=0)
  values, idx = jax.lax.top_k(amax, min(slots, k))
  return jnp.sort(jnp.where(values > threshold, idx, k).astype(jnp.int32))


def count_outliers(x_mk, threshold: float):
  """How many input features have max |x| > threshold ([..., M, K] -> [...])."""
  return jnp.sum(jnp.max(jnp.abs(x_mk.astype(jnp.float32)), axis=-2) > threshold, axis=-1)


def _outlier_slots(w_skn, x_smk, settings: dict) -> dict:
  """No cap: as many float slots as the stack's most outlier-rich layer needs (at least 1)."""
  del w_skn
  if settings["max_outliers"] is not None:
    return settings
  found = int(np.max(np.asarray(count_outliers(x_smk, settings["threshold"]))))
  return {**settings, "_slots": max(found, 1)}  # Internal: not a user setting.


def _capped(info: dict, settings: dict) -> str | None:
  if info["outliers_found"] <= info["outliers_kept"]:
    return None
  return (
    f"llm_int8 found {info['outliers_found']} outlier features above threshold="
    f"{settings['threshold']} but max_outliers={settings['max_outliers']} keeps "
    f"{info['outliers_kept']} in float; the rest go through int8 (max_outliers=None keeps all)"
  )


@register(
  "llm_int8",
  stage="quantize",
  defaults={"threshold": 6.0, "max_outliers": None, "outlier_dtype": "bfloat16"},
  checks={
    "threshold": number(0.0, 1e9, lo_open=True),
    "max_outliers": (lambda v: v is None or (is_int(v) and v >= 1), "None or an integer >= 1"),
    "outlier_dtype": one_of("bfloat16", "float32"),
  },
  needs_calibration=True,
  resolve=_outlier_slots,
  warning=_capped,
)
def _llm_int8(w_kn, x_mk, settings):
  """Outlier features (from calibration) in float, the rest int8 x int8.

  `max_outliers`: None keeps every feature above `threshold` (the paper); an integer caps the
  float slots per layer, keeping the largest. Report: `outliers_found`, `outliers_kept`.
  """
  w = w_kn.astype(jnp.float32)
  # Called without `_outlier_slots` (directly, not through the rules), there is a slot per input.
  slots = settings["max_outliers"] or settings.get("_slots") or w.shape[0]
  idx = outlier_features(x_mk, settings["threshold"], slots)
  w_out = jnp.take(w, idx, axis=0, mode="fill", fill_value=0)  # [slots, N]
  w_in = w.at[idx].set(0.0, mode="drop")
  w_q, w_scale = formats.quantize_int8(w_in)
  arrays = {
    "w_q": w_q,
    "w_scale": w_scale,
    "outlier_idx": idx,
    "outlier_w": w_out.astype(settings["outlier_dtype"]),
  }
  info = {
    "outliers_found": count_outliers(x_mk, settings["threshold"]),
    "outliers_kept": jnp.sum(idx < w.shape[0]),
  }
  return Replacement(OutlierInt8Linear, arrays, {}, info)
