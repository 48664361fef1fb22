"""Low-rank factorization: w [K, N] ≈ a [K, r] @ b [r, N], stored as two factors.

  svd      truncated SVD of the weight (the best rank-r approximation of w in Frobenius norm)
  svd_llm  SVD-LLM's truncation-aware data whitening (Wang et al. 2024): the best rank-r
           approximation of the layer's outputs on calibration inputs. With XᵀX/M = LLᵀ
           (Cholesky, dampened by `damp` · mean diag), ‖X(W − Ŵ)‖_F = ‖Lᵀ(W − Ŵ)‖_F up to the
           tokens' scale, so truncate the SVD of LᵀW = UΣVᵀ and undo the whitening:
           a = L⁻ᵀ U_r Σ_r^½, b = Σ_r^½ V_rᵀ. Only the whitening: SVD-LLM's parameter update
           after truncation (sequential low-rank fine-tuning) is not implemented, and the damping
           is always added (SVD-LLM adds it only when XᵀX is not positive definite).
  (ASVD's diagonal activation scaling with sensitivity-based rank allocation is `compress.asvd`.)

Rank (give at most one; none means energy=0.9):
  energy          the smallest r keeping that fraction of Σσ² (of the whitened spectrum for svd_llm)
  param_fraction  the largest r with r(K + N) ≤ param_fraction · K · N (a parameter budget)
  rank            a fixed r (capped at min(K, N))
  losparse  `svd` plus a sparse residual (LoSparse, Li et al. 2023, here post-training: no
         iterative retraining): each output keeps the round(residual_density · K) largest entries
         of W − ab, stored as values and row indices
The energy rule depends on the weights' values while every layer of a stacked module must have the
same shapes, so both methods are whole-model methods that run eagerly (float64 SVDs in numpy) and a
stack gets the largest rank any of its layers asks for. Nothing can follow them (they replace the
projection with a `LowRankLinear`). A layer whose factors would not be smaller than its K · N
weights (a flat spectrum at a high energy) is left dense: its report row still names the method.
"""

import jax.numpy as jnp
import numpy as np

from reslm.compress.layers import CompressedLinear
from reslm.compress.registry import is_int, is_num, number, register
from reslm.compress.targets import install, target_at


class LowRankLinear(CompressedLinear, kind="low_rank"):
  """y = (x @ a) @ b; stores r(K + N) numbers instead of K · N."""

  ARRAYS = {"a": ("in", None), "b": (None, "out")}

  def matmul(self, x_mk):
    a, b = self.a[...], self.b[...]
    return ((x_mk.astype(a.dtype) @ a) @ b).astype(self.dtype)

  @classmethod
  def weight(cls, arrays, static, k):
    return arrays["a"].astype(jnp.float32) @ arrays["b"].astype(jnp.float32)


class LowRankSparseLinear(CompressedLinear, kind="low_rank_sparse"):
  """y = (x @ a) @ b + x @ S, S [K, N] holding `values` [c, N] at rows `rows` [c, N] per column."""

  ARRAYS = {"a": ("in", None), "b": (None, "out"), "values": (None, "out"), "rows": (None, "out")}

  @staticmethod
  def _sparse(values, rows, k):
    cols = jnp.broadcast_to(jnp.arange(values.shape[1]), values.shape)
    return jnp.zeros((k, values.shape[1]), jnp.float32).at[rows, cols].set(values)

  def matmul(self, x_mk):
    a, b = self.a[...], self.b[...]
    s = self._sparse(self.values[...], self.rows[...], self.in_features)
    x = x_mk.astype(a.dtype)
    return ((x @ a) @ b + x @ s.astype(a.dtype)).astype(self.dtype)

  @classmethod
  def weight(cls, arrays, static, k):
    low = arrays["a"].astype(jnp.float32) @ arrays["b"].astype(jnp.float32)
    return low + cls._sparse(arrays["values"].astype(jnp.float32), arrays["rows"], k)


def sparse_residual(residual_kn: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The `count` largest |entries| of each column: (values [c, N], row indices [c, N])."""
  rows = np.argsort(-np.abs(residual_kn), axis=0, kind="stable")[:count]
  return np.take_along_axis(residual_kn, rows, axis=0), rows.astype(np.int32)


RANK_DEFAULTS = {"energy": None, "param_fraction": None, "rank": None}
RANK_CHECKS = {
  "energy": (lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
  "param_fraction": (lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
  "rank": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
}


def _validate(settings: dict, where: str) -> None:
  given = [k for k in RANK_DEFAULTS if settings[k] is not None]
  if len(given) > 1:
    raise ValueError(f"{where} gives {' and '.join(given)}; give one rank rule")


def budget_rank(fraction: float, k: int, n: int) -> int:
  """The largest r >= 1 with r(K + N) <= fraction · K · N, capped at min(K, N)."""
  return int(min(k, n, max(1, np.floor(fraction * k * n / (k + n)))))


def choose_rank(sigma: np.ndarray, k: int, n: int, settings: dict) -> int:
  """The rank the settings ask for, given singular values `sigma` (descending) of a K x N map."""
  full = min(k, n)
  if settings["rank"] is not None:
    return min(settings["rank"], full)
  if settings["param_fraction"] is not None:
    return budget_rank(settings["param_fraction"], k, n)
  energy = 0.9 if settings["energy"] is None else settings["energy"]
  cum = np.cumsum(sigma.astype(np.float64) ** 2)
  if cum[-1] == 0:
    return 1
  # Smallest r with cum[r - 1] >= energy · total (a little slack for rounding at energy = 1).
  return int(min(full, np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12)) + 1))


def svd_parts(w_kn, x_mk=None, damp: float = 0.01):
  """(U, σ, Vᵀ, unwhiten) with w = unwhiten(U diag(σ) Vᵀ): plain, or whitened by x's covariance."""
  w = np.asarray(w_kn, np.float64)
  if x_mk is None:
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u, s, vt, lambda a: a
  x = np.asarray(x_mk, np.float64)
  g = x.T @ x / x.shape[0]  # [K, K]
  g += damp * max(float(np.mean(np.diag(g))), 1e-12) * np.eye(g.shape[0])
  chol = np.linalg.cholesky(g)  # g = L Lᵀ
  u, s, vt = np.linalg.svd(chol.T @ w, full_matrices=False)
  return u, s, vt, lambda a: np.linalg.solve(chol.T, a)


def factors(parts, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """a [K, r], b [r, N] from `svd_parts`, the singular values split evenly between them."""
  u, s, vt, unwhiten = parts
  root = np.sqrt(s[:rank])
  return unwhiten(u[:, :rank] * root), root[:, None] * vt[:rank]


def _factorize(model, targets, calibration, settings, *, aware: bool, density: float = 0.0):
  manifest = []
  for t0 in targets:
    t = target_at(model, t0.path)  # A previous stage may have changed the weights.
    w = np.asarray(t.weights())  # [slices, K, N]
    _, k, n = w.shape
    x = calibration.get(t.name) if aware else None
    if aware and x is None:
      raise ValueError(f"method svd_llm needs calibration inputs for {t.name}")
    parts = [
      svd_parts(w[i], None if x is None else x[i], settings.get("damp", 0.0)) for i in range(len(w))
    ]
    rank = max(choose_rank(p[1], k, n, settings) for p in parts)  # One shape per stack.
    count = int(round(density * k))  # Residual entries per output.
    if rank * (k + n) + 2 * count * n >= k * n:
      continue  # Would not shrink the layer: leave it dense.
    ab = [factors(p, rank) for p in parts]
    arrays = {
      "a": np.stack([a for a, _ in ab]).astype(np.float32),
      "b": np.stack([b for _, b in ab]).astype(np.float32),
    }
    cls = LowRankLinear
    if count:
      cls = LowRankSparseLinear
      sparse = [sparse_residual(w[i] - a @ b, count) for i, (a, b) in enumerate(ab)]
      arrays["values"] = np.stack([v for v, _ in sparse]).astype(np.float32)
      arrays["rows"] = np.stack([r for _, r in sparse])
    new = install(model, t, cls, arrays)
    manifest.append({"path": list(t.path), "module": new.spec()})
  return manifest


@register(
  "svd",
  stage="lowrank",
  defaults=RANK_DEFAULTS,
  checks=RANK_CHECKS,
  per_layer=False,
  validate=_validate,
)
def _svd(model, targets, calibration, settings):
  """Truncated SVD of each selected projection (rank by energy, parameter budget or fixed)."""
  return _factorize(model, targets, calibration, settings, aware=False)


@register(
  "svd_llm",
  stage="lowrank",
  defaults={**RANK_DEFAULTS, "damp": 0.01},
  checks={**RANK_CHECKS, "damp": number(0.0, 1.0, lo_open=True)},
  needs_calibration=True,
  per_layer=False,
  validate=_validate,
)
def _svd_llm(model, targets, calibration, settings):
  """SVD of the weights whitened by the calibration inputs' covariance (Cholesky; SVD-LLM)."""
  return _factorize(model, targets, calibration, settings, aware=True)


@register(
  "losparse",
  stage="lowrank",
  defaults={**RANK_DEFAULTS, "residual_density": 0.05},
  checks={**RANK_CHECKS, "residual_density": number(0.0, 1.0, lo_open=True)},
  per_layer=False,
  validate=_validate,
)
def _losparse(model, targets, calibration, settings):
  """Truncated SVD plus the largest entries of the residual, per output."""
  density = settings["residual_density"]
  return _factorize(model, targets, calibration, settings, aware=False, density=density)
