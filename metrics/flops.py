"""Analytic and compiler-reported FLOP counts, and XLA memory analysis.

Analytic counts follow the usual convention of 2 FLOPs per multiply-add and count only matmuls
(norms, activations and softmax are lower order). XLA's `cost_analysis()` counts every HLO op but
visits a while-loop body once, so a `scan` over layers reports roughly one layer's worth of FLOPs,
and a chunked or blocked mixer one chunk's; reports must label which figure they use. A model's
FLOPs with every loop counted are in `metrics.jaxpr_flops` (any program) and
`training.flops.model_flops` (a configured model).
"""

from typing import Any

_MLP_MATRICES = {"swiglu": 3, "gelu": 2}


def transformer_flops_per_token(
  *,
  num_layers: int,
  d_model: int,
  num_heads: int,
  num_kv_heads: int,
  head_dim: int,
  mlp_dim: int,
  mlp_kind: str,
  vocab_size: int,
  seq_len: int,
  causal: bool = True,
  include_lm_head: bool = True,
) -> dict[str, float]:
  """Returns matmul FLOPs per token of a decoder-only transformer.

  With D = d_model, H = num_heads, K = num_kv_heads, h = head_dim, F = mlp_dim, T = seq_len,
  V = vocab_size, L = num_layers and m = 3 (swiglu) or 2 (gelu), per token:

    projections = 2·D·H·h (q) + 2·2·D·K·h (k, v) + 2·H·h·D (o)
    attention   = 2·2·T·H·h (scores QKᵀ and AV), halved when causal
    mlp         = m·2·D·F
    lm_head     = 2·D·V (if include_lm_head)
    forward     = L·(projections + attention + mlp) + lm_head
    train       = 3·forward (backward ≈ 2× forward)

  The causal halving is the standard average over positions (exactly (T+1)/2 keys per query);
  implementations that compute the full score matrix and mask it still spend the full count.

  Args:
    num_layers: Number of transformer blocks.
    d_model: Residual stream width.
    num_heads: Number of query heads.
    num_kv_heads: Number of key/value heads (GQA; equals `num_heads` for MHA).
    head_dim: Per-head width.
    mlp_dim: Hidden width of the MLP.
    mlp_kind: "swiglu" (gate, up, down matrices) or "gelu" (up, down).
    vocab_size: Output vocabulary size.
    seq_len: Context length T attended over.
    causal: Whether attention is causal.
    include_lm_head: Whether to count the output projection onto the vocabulary.

  Returns:
    A dict with `forward` and `train` FLOPs per token plus the per-token breakdown
    `attention_projections`, `attention_scores`, `mlp` (all layers) and `lm_head`.
  """
  if mlp_kind not in _MLP_MATRICES:
    raise ValueError(f"mlp_kind must be one of {sorted(_MLP_MATRICES)}, got {mlp_kind!r}")
  q_width = num_heads * head_dim
  kv_width = num_kv_heads * head_dim
  projections = 2 * d_model * q_width + 2 * 2 * d_model * kv_width + 2 * q_width * d_model
  attention = 2 * 2 * seq_len * q_width
  if causal:
    attention /= 2
  mlp = _MLP_MATRICES[mlp_kind] * 2 * d_model * mlp_dim
  lm_head = 2 * d_model * vocab_size if include_lm_head else 0
  forward = num_layers * (projections + attention + mlp) + lm_head
  return {
    "forward": float(forward),
    "train": float(3 * forward),
    "attention_projections": float(num_layers * projections),
    "attention_scores": float(num_layers * attention),
    "mlp": float(num_layers * mlp),
    "lm_head": float(lm_head),
  }


def six_n_flops_per_token(n_matmul_params: int | float) -> float:
  """Returns the dense rule-of-thumb training FLOPs per token, 6·N.

  2·N for the forward pass and 4·N for the backward pass, where N counts the parameters that take
  part in matmuls, active per token: not the input embedding table (a lookup), but the LM head
  (untied, or the tied table in its role as the head), and for a mixture of experts only the
  experts a token is routed to. Attention over the context and other activation-by-activation
  products are ignored. `training.flops.model_flops` measures N as `matmul_params`.

  Args:
    n_matmul_params: Number of matmul parameters active per token.

  Returns:
    6·N as a float.
  """
  return 6.0 * float(n_matmul_params)


def _first_cost_dict(compiled: Any) -> dict | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Unsupported on some backends: report as missing.
    return None
  # Older jax returned a list with one dict per computation; newer returns the dict itself.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return cost if isinstance(cost, dict) else None


def _nonneg(value: Any) -> float | None:
  # XLA uses negative values for "unknown".
  if value is None:
    return None
  value = float(value)
  return value if value >= 0 else None


def xla_cost(compiled: Any) -> dict[str, float | None]:
  """Returns XLA's cost estimate for a compiled computation.

  XLA counts a while-loop body once regardless of its trip count, so computations that `scan`
  over layers (or loop over microbatches) are undercounted; callers must label the figure.

  Args:
    compiled: A `jax.stages.Compiled` (from `jax.jit(f).lower(...).compile()`), or None.

  Returns:
    A dict with `flops`, `bytes_accessed` and `optimal_seconds`; each is None when unavailable.
  """
  cost = _first_cost_dict(compiled) if compiled is not None else None
  cost = cost or {}
  return {
    "flops": _nonneg(cost.get("flops")),
    "bytes_accessed": _nonneg(cost.get("bytes accessed")),
    "optimal_seconds": _nonneg(cost.get("optimal_seconds")),
  }


_MEMORY_FIELDS = {
  "argument_bytes": "argument_size_in_bytes",
  "output_bytes": "output_size_in_bytes",
  "alias_bytes": "alias_size_in_bytes",
  "temp_bytes": "temp_size_in_bytes",
  "generated_code_bytes": "generated_code_size_in_bytes",
}


def memory_analysis(compiled: Any) -> dict[str, int | None]:
  """Returns XLA's buffer-assignment sizes for a compiled computation.

  `peak_bytes = argument_bytes + output_bytes - alias_bytes + temp_bytes + generated_code_bytes`:
  inputs and outputs live simultaneously except for donated (aliased) buffers, plus the scratch
  space and the executable itself. This is an upper bound on device memory for one call.

  Args:
    compiled: A `jax.stages.Compiled`, or None.

  Returns:
    A dict with `argument_bytes`, `output_bytes`, `alias_bytes`, `temp_bytes`,
    `generated_code_bytes` and `peak_bytes`; all None when the backend gives no analysis.
  """
  stats = None
  if compiled is not None:
    try:
      stats = compiled.memory_analysis()
    except Exception:  # Unsupported on some backends: report as missing.
      stats = None
  out: dict[str, int | None] = {}
  for key, attr in _MEMORY_FIELDS.items():
    value = getattr(stats, attr, None) if stats is not None else None
    out[key] = int(value) if value is not None else None
  parts = [out[k] for k in _MEMORY_FIELDS]
  if any(p is None for p in parts):
    out["peak_bytes"] = None
  else:
    out["peak_bytes"] = (
      out["argument_bytes"]
      + out["output_bytes"]
      - out["alias_bytes"]
      + out["temp_bytes"]
      + out["generated_code_bytes"]
    )
  return out
