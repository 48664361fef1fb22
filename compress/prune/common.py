"""Settings and masks shared by the pruning methods.

Every method prunes to `sparsity` (a fraction of zeros) or to an N:M pattern (`n_m="2:4"`: at
most N non-zeros in every M consecutive input rows of w [K, N], per output column: the layout
sparse matrix units such as NVIDIA's 2:4 use, where the groups run along the reduction axis).
Give one of the two; neither means `sparsity=0.5`. With N:M, a K that is not a multiple of M ends
in a partial group that also keeps at most N.

Masks are boolean "keep" arrays built from scores (higher = more important) by ranking, so the
number of zeros is exact even with ties; shapes are static, so every mask is traceable.
"""

import re

import jax.numpy as jnp

from reslm.compress.registry import is_num

SPARSITY_DEFAULTS = {"sparsity": None, "n_m": None}
SPARSITY_CHECKS = {
  "sparsity": (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
  "n_m": (
    lambda v: isinstance(v, str) and parse_n_m(v) is not None,
    'a string "N:M" with 0 < N < M, e.g. "2:4"',
  ),
}


def parse_n_m(text: str) -> tuple[int, int] | None:
  """ "2:4" -> (2, 4); None if malformed."""
  match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
  if match is None:
    return None
  n, m = int(match[1]), int(match[2])
  return (n, m) if 0 < n < m else None


def validate_sparsity(settings: dict, where: str) -> None:
  if settings["sparsity"] is not None and settings["n_m"] is not None:
    raise ValueError(
      f"{where} gives sparsity={settings['sparsity']!r} and n_m={settings['n_m']!r}; give one"
    )


def pattern(settings: dict) -> tuple[float, tuple[int, int] | None]:
  """(sparsity, (N, M) or None) from validated settings."""
  if settings["n_m"] is not None:
    n, m = parse_n_m(settings["n_m"])
    return 1.0 - n / m, (n, m)
  s = settings["sparsity"]
  return (0.5 if s is None else float(s)), None


def ranks(score, axis=None):
  """Rank of every entry along `axis` (0 = lowest; flattened when axis is None)."""
  flat = score.reshape(-1) if axis is None else score
  order = jnp.argsort(flat, axis=-1 if axis is None else axis, stable=True)
  r = jnp.argsort(order, axis=-1 if axis is None else axis, stable=True)
  return r.reshape(score.shape)


def lowest_mask(score, count: int, axis=None):
  """Keep-mask pruning exactly the `count` lowest scores (over all entries, or along `axis`)."""
  return ranks(score, axis) >= count


def prune_count(size: int, sparsity: float) -> int:
  return int(round(size * sparsity))


def n_m_mask(score_kn, n: int, m: int):
  """Keep-mask of the N highest scores in every M consecutive rows, per column ([K, N] -> [K, N]).

  Rows added to fill the last group score -inf, so they take the pruned places first.
  """
  k, cols = score_kn.shape
  pad = -k % m
  s = jnp.pad(score_kn.astype(jnp.float32), ((0, pad), (0, 0)), constant_values=-jnp.inf)
  s = s.reshape(-1, m, cols)  # [groups, M, N]
  keep = ranks(s, axis=1) >= m - n
  return keep.reshape(-1, cols)[:k]


def mask_for(score_kn, settings: dict, *, per_column: bool):
  """The keep-mask the settings ask for: N:M, or unstructured over the whole layer or per column."""
  sparsity, nm = pattern(settings)
  if nm is not None:
    return n_m_mask(score_kn, *nm)
  k, cols = score_kn.shape
  if per_column:
    return lowest_mask(score_kn, prune_count(k, sparsity), axis=0)
  return lowest_mask(score_kn, prune_count(k * cols, sparsity))
