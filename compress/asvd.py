"""ASVD (Yuan et al. 2023): activation-aware SVD with sensitivity-based truncation rank search.

Scaling (the paper's §3.2, in this code's orientation y = x @ w, w [K, N]; the paper's W S with
W [out, in] is (S w)ᵀ here). Input feature k's mean magnitude on the calibration tokens sets

  S_kk = (mean_t |x_tk|)^α + 1e-6        (α = 0.5 by default, as in the paper; the 1e-6 as in
                                          its code, against division by zero)

and the SVD of the scaled weight S w = U Σ Vᵀ is truncated to rank r, S⁻¹ folded back into the
input factor and the singular values split between the two:

  a = S⁻¹ U_r Σ_r^½ [K, r],   b = Σ_r^½ V_rᵀ [r, N]

so the truncation drops the directions that matter least for inputs of the calibration scale.

Rank: sensitivity-based truncation rank searching (the paper's §3.3). A layer's parameter ratio
ρ means rank(ρ) = floor(ρ · K · N / (K + N)): its two factors hold about ρ of its weights. For
every selected module (a unit) and every candidate ρ in {step, 2·step, ...} below 1 (the paper's
0.1, ..., 0.9), the calibration loss is measured with only that unit truncated to rank(ρ), the
rest of the model unchanged: the paper's perplexity, here its logarithm, the mean next-token
cross-entropy on the calibration sequences (the same order). The (unit, ρ, loss) triples are
sorted by loss; a threshold τ admits the triples with loss ≤ τ, and each unit takes the smallest
admitted ρ (a unit with none stays dense, ρ = 1). τ is the smallest threshold (the fewest, least
harmful truncations) whose allocation keeps the selected modules within `param_fraction` of their
dense parameters: a binary search over the sorted list, as in the paper's code, here returning
exactly that allocation (the released code keeps its last probe, which may be one step off).
`search=False` gives every unit ρ = `param_fraction` instead (uniform allocation, an ablation).

Deviations: every layer of a `LayerStack` module shares one shape, and every decoder here keeps
its layers in one (also with `scan_layers=False`), so a unit is a selected module with all its
stacked layers and one rank for all: one projection kind across the layers (e.g. every layer's
MLP down-projection; 7 units in the 4-layer Tiny Shakespeare model, not the paper's 28), its
sensitivity the loss with all those layers truncated together. A unit's truncated loss is
measured with the product a @ b written into its kernel (the function the factored layer
computes). Units that a ρ would not shrink (rank(ρ)(K + N) >= K · N) stay dense at that ρ.
"""

import numpy as np

from reslm.compress.lowrank import LowRankLinear, budget_rank, factors
from reslm.compress.prune.structured import next_token_loss
from reslm.compress.registry import BOOL, ModelData, number, register
from reslm.compress.targets import install, target_at

EPS = 1e-6


def scaling(x_mk: np.ndarray, alpha: float) -> np.ndarray:
  """S_kk = (mean_t |x_tk|)^α + 1e-6, float64 [K]."""
  return np.mean(np.abs(np.asarray(x_mk, np.float64)), axis=0) ** alpha + EPS


def scaled_svd_parts(w_kn, s_k: np.ndarray):
  """(U, σ, Vᵀ, unscale) of S w, with w = unscale(U diag(σ) Vᵀ) (`lowrank.factors` takes it)."""
  u, sigma, vt = np.linalg.svd(s_k[:, None] * np.asarray(w_kn, np.float64), full_matrices=False)
  return u, sigma, vt, lambda a: a / s_k[:, None]


def candidates(step: float) -> list[float]:
  """The candidate parameter ratios step, 2·step, ... below 1 (rounded to 6 digits)."""
  return [round(i * step, 6) for i in range(1, int(np.ceil(1 / step - 1e-9)))]


def unit_params(shape: tuple[int, int, int], ratio: float) -> int:
  """Stored parameters of a unit (slices, K, N) at ratio ρ: factors, or dense if not smaller."""
  slices, k, n = shape
  if ratio >= 1:
    return slices * k * n
  return slices * min(budget_rank(ratio, k, n) * (k + n), k * n)


def allocate(
  losses: dict[str, dict[float, float]],
  shapes: dict[str, tuple[int, int, int]],
  param_fraction: float,
) -> dict[str, float]:
  """Sensitivity-based rank search: each unit's ratio (1 = dense) within the parameter budget.

  Args:
    losses: unit -> {ratio: calibration loss with only that unit truncated at that ratio}.
    shapes: unit -> (slices, K, N).
    param_fraction: The selected units may keep at most this fraction of their dense parameters.

  Returns:
    unit -> ratio, from the smallest loss threshold whose allocation meets the budget.

  Raises:
    ValueError: Not even every unit at its smallest ratio meets the budget.
  """
  triples = sorted(
    ((unit, ratio, loss) for unit, row in losses.items() for ratio, loss in row.items()),
    key=lambda t: -t[2],
  )  # Most harmful first; a threshold admits a suffix.
  budget = param_fraction * sum(unit_params(s, 1.0) for s in shapes.values())

  def allocation(start: int) -> dict[str, float]:
    ratios = dict.fromkeys(shapes, 1.0)
    for unit, ratio, _ in triples[start:]:
      ratios[unit] = min(ratios[unit], ratio)
    return ratios

  def params(start: int) -> int:
    return sum(unit_params(shapes[u], r) for u, r in allocation(start).items())

  if params(0) > budget:
    smallest = min(r for row in losses.values() for r in row)
    raise ValueError(
      f"asvd param_fraction={param_fraction} is below what the smallest candidate ratio "
      f"{smallest} gives ({params(0) / (budget / param_fraction):.3f}); raise param_fraction "
      "or lower ratio_step"
    )
  lo, hi = 0, len(triples)  # params(lo) <= budget; find the largest such start.
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if params(mid) <= budget:
      lo = mid
    else:
      hi = mid - 1
  return allocation(lo)


def _factor_stack(w_skn: np.ndarray, x_smk: np.ndarray, alpha: float, rank: int):
  """Per stacked layer, ASVD factors at `rank`: (a [slices, K, r], b [slices, r, N])."""
  pairs = zip(w_skn, x_smk, strict=True)
  ab = [factors(scaled_svd_parts(w, scaling(x, alpha)), rank) for w, x in pairs]
  return np.stack([a for a, _ in ab]), np.stack([b for _, b in ab])


def _validate(settings: dict, where: str) -> None:
  if not settings["search"]:
    return
  if settings["param_fraction"] < settings["ratio_step"]:
    raise ValueError(
      f"{where}.param_fraction={settings['param_fraction']} is below "
      f"ratio_step={settings['ratio_step']}, the smallest candidate ratio of the search"
    )


@register(
  "asvd",
  stage="lowrank",
  defaults={"param_fraction": 0.5, "alpha": 0.5, "search": True, "ratio_step": 0.1},
  checks={
    "param_fraction": number(0.0, 1.0, lo_open=True),
    "alpha": number(0.0, 1.0),
    "search": BOOL,
    "ratio_step": number(0.0, 0.5, lo_open=True),
  },
  needs_calibration=True,
  per_layer=False,
  needs_data=True,
  validate=_validate,
)
def _asvd(model, targets, calibration, settings, data: ModelData):
  """Scales by activation magnitudes, allocates ranks by calibration-loss sensitivity, factors.

  Returns:
    Manifest entries of the factored modules and one "info" entry: each unit's ratio and rank,
    the sensitivity table, the calibration loss before and after, and the parameter counts.
  """
  if model.cfg.kind != "decoder":
    raise ValueError(f"asvd measures next-token loss; model.kind={model.cfg.kind!r} is not decoder")
  current = [target_at(model, t.path) for t in targets]  # A previous stage may have changed them.
  stacks, inputs, shapes = {}, {}, {}
  for t in current:
    if t.name not in calibration:
      raise ValueError(f"method asvd needs calibration inputs for {t.name}")
    stacks[t.name] = np.asarray(t.weights(), np.float64)  # [slices, K, N]
    inputs[t.name] = np.asarray(calibration[t.name])
    shapes[t.name] = stacks[t.name].shape
  alpha = settings["alpha"]

  def loss() -> float:
    return next_token_loss(model, data.tokens, data.batch_size)[0]

  base = loss()
  sensitivity = {}
  if settings["search"]:
    for t in current:
      kernel = t.module.kernel
      original = kernel[...]
      sensitivity[t.name] = {}
      for ratio in candidates(settings["ratio_step"]):
        _, k, n = shapes[t.name]
        a, b = _factor_stack(stacks[t.name], inputs[t.name], alpha, budget_rank(ratio, k, n))
        kernel[...] = (a @ b).reshape(kernel.shape).astype(kernel.dtype)
        sensitivity[t.name][ratio] = loss()
      kernel[...] = original
    ratios = allocate(sensitivity, shapes, settings["param_fraction"])
  else:
    ratios = dict.fromkeys(shapes, settings["param_fraction"])

  manifest, ranks = [], {}
  for t in current:
    _, k, n = shapes[t.name]
    rank = budget_rank(ratios[t.name], k, n)
    if ratios[t.name] >= 1 or rank * (k + n) >= k * n:
      continue  # Dense: not truncated, or factors would not be smaller.
    a, b = _factor_stack(stacks[t.name], inputs[t.name], alpha, rank)
    arrays = {"a": a.astype(np.float32), "b": b.astype(np.float32)}
    new = install(model, t, LowRankLinear, arrays)
    manifest.append({"path": list(t.path), "module": new.spec()})
    ranks[t.name] = rank
  dense = sum(unit_params(s, 1.0) for s in shapes.values())
  kept = sum(unit_params(shapes[u], r) for u, r in ratios.items())
  after = loss()
  info = {
    "method": "asvd",
    "alpha": alpha,
    "search": settings["search"],
    "ratios": ratios,
    "ranks": ranks,
    "params": {"dense": dense, "after": kept, "fraction": kept / dense},
    "calibration_loss": {"before": base, "after": after},
    "sensitivity": {u: {str(r): v for r, v in row.items()} for u, row in sensitivity.items()},
    "summary": (
      f"asvd: {len(ranks)} of {len(shapes)} modules factored, parameters {kept:,} of {dense:,} "
      f"({kept / dense:.3f}); calibration loss {base:.4f} -> {after:.4f}"
    ),
  }
  return [*manifest, {"path": [], "info": info}]
