"""Mixture of experts: compiled FLOPs per token and parameters as the number of experts grows.

  python -m experiments.benchmarks.moe [--experts=1,8,32] [--dispatches=capacity,dropless]

The Switch Transformer claim: with top-1 routing, adding experts multiplies parameters but leaves
the compute per token (nearly) unchanged. For a small decoder LM with an MoE MLP in every block
and each (num_experts, dispatch, capacity factor), this compiles with XLA and reports, per token:
  - FLOPs of the whole LM's forward and forward+backward (loss + gradients) from
    `cost_analysis()`; layers are unrolled (scan_layers=False) so no loop body is counted once,
  - FLOPs of one MoE layer's forward alone (router + dispatch + experts),
  - total and active parameters (`metrics.params.active_params`),
  - wall time of the forward+backward (median of repeats; CPU, indicative only),
with a dense SwiGLU model of the same width as the baseline row. Writes results/moe.json.

Reading it: capacity dispatch computes E·C ≈ capacity_factor·tokens expert rows, but C is clamped
to the token count, so E=1 has no idle slots while E>1 pays (capacity_factor - 1) extra; the
router adds 2·d·E FLOPs per token. XLA:CPU lowers `ragged_dot` (dropless) to a dense product over
every expert, so on CPU its FLOPs grow ~linearly with E; a grouped-matmul kernel removes that.
"""

import json
import os
import time

from absl import app, flags

flags.DEFINE_list("experts", ["1", "8", "32"], "Numbers of experts.")
flags.DEFINE_list("dispatches", ["capacity", "dropless"], "Dispatch modes of top-k routing.")
flags.DEFINE_integer("top_k", 1, "Experts per token.")
flags.DEFINE_list("capacity_factors", ["1.0", "1.25"], "Capacity factors of capacity dispatch.")
flags.DEFINE_integer("d_model", 128, "Model width.")
flags.DEFINE_integer("num_layers", 2, "Blocks.")
flags.DEFINE_integer("num_heads", 4, "Attention heads.")
flags.DEFINE_integer("vocab", 256, "Vocabulary size.")
flags.DEFINE_integer("batch", 8, "Sequences per batch.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported); 0 skips timing.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Output directory.")
FLAGS = flags.FLAGS


def _config(mlp: str, options: dict):
  from reslm.models import ModelConfig

  return ModelConfig(
    vocab_size=FLAGS.vocab,
    d_model=FLAGS.d_model,
    num_layers=FLAGS.num_layers,
    num_heads=FLAGS.num_heads,
    max_seq_len=FLAGS.seq_len,
    mlp=mlp,
    mlp_options=options,
    scan_layers=False,  # XLA counts a scanned body once; unrolled layers are all counted.
  )


def _flops(fn, *args) -> float:
  import jax

  from reslm.metrics import xla_cost

  return xla_cost(jax.jit(fn).lower(*args).compile())["flops"]


def _median_seconds(fn, *args) -> float | None:
  import jax
  import numpy as np

  if FLAGS.repeats <= 0:
    return None
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure(mlp: str, options: dict) -> dict:
  """FLOPs per token, parameters and time of one model configuration."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from reslm.metrics.params import active_params, count_params
  from reslm.models import MLPS, build_model
  from reslm.models.moe import expert_usage

  cfg = _config(mlp, options)
  model = build_model(cfg)
  graphdef, params = nnx.split(model, nnx.Param)
  n_tokens = FLAGS.batch * FLAGS.seq_len
  tokens = jax.random.randint(jax.random.key(0), (FLAGS.batch, FLAGS.seq_len), 0, cfg.vocab_size)

  def forward(params, tokens):
    return nnx.merge(graphdef, params)(tokens).logits

  def loss(params, tokens):
    out = nnx.merge(graphdef, params)(tokens)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], tokens[:, 1:])
    return jnp.mean(ce) + out.aux_loss

  fwd_bwd = jax.value_and_grad(loss)
  layer = MLPS.build(mlp, cfg, rngs=nnx.Rngs(0))
  layer_def, layer_params = nnx.split(layer, nnx.Param)
  x = jnp.zeros((FLAGS.batch, FLAGS.seq_len, cfg.d_model), cfg.compute_dtype)

  def layer_forward(p, x):
    out = nnx.merge(layer_def, p)(x)
    return out[0] if isinstance(out, tuple) else out

  usage = expert_usage(cfg)
  return {
    "params_total": count_params(params),
    "params_active": active_params(params, **usage) if usage else count_params(params),
    "fwd_flops_per_token": _flops(forward, params, tokens) / n_tokens,
    "fwd_bwd_flops_per_token": _flops(fwd_bwd, params, tokens) / n_tokens,
    "mlp_layer_fwd_flops_per_token": _flops(layer_forward, layer_params, x) / n_tokens,
    "fwd_bwd_time_s": _median_seconds(jax.jit(fwd_bwd), params, tokens),
  }


def _row_name(row) -> str:
  if row["num_experts"] is None:
    return "dense swiglu"
  cf = f" cf={row['capacity_factor']:g}" if row["dispatch"] == "capacity" else ""
  return f"{row['dispatch']}{cf} E={row['num_experts']}"


def _table(rows):
  header = (
    f"{'model':24s}{'params':>11s}{'active':>11s}{'fwd F/tok':>12s}{'f+b F/tok':>12s}"
    f"{'MLP F/tok':>11s}{'f+b vs E=1':>11s}{'time ms':>9s}"
  )
  print("\n" + header)
  arm = lambda r: (r["dispatch"], r["capacity_factor"])
  base = {arm(r): r for r in rows if r["num_experts"] == 1}
  for r in rows:
    ref = base.get(arm(r))
    ratio = r["fwd_bwd_flops_per_token"] / ref["fwd_bwd_flops_per_token"] if ref else None
    t = "-" if r["fwd_bwd_time_s"] is None else f"{r['fwd_bwd_time_s'] * 1e3:.0f}"
    print(
      f"{_row_name(r):24s}{r['params_total']:>11,d}{r['params_active']:>11,d}"
      f"{r['fwd_flops_per_token']:>12.4g}{r['fwd_bwd_flops_per_token']:>12.4g}"
      f"{r['mlp_layer_fwd_flops_per_token']:>11.4g}"
      + (f"{ratio:>11.3f}" if ratio is not None else f"{'-':>11s}")
      + f"{t:>9s}"
    )


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  import jax

  import reslm.models  # noqa: F401  (registers the MoE MLP)

  rows = [{"num_experts": None, "dispatch": None, "capacity_factor": None}]
  rows[0].update(measure("swiglu", {}))
  arms = [
    (d, float(cf) if d == "capacity" else None)
    for d in FLAGS.dispatches
    for cf in (FLAGS.capacity_factors if d == "capacity" else [None])
  ]
  for dispatch, cf in arms:
    for e in (int(v) for v in FLAGS.experts):
      options = dict(num_experts=e, top_k=FLAGS.top_k, dispatch=dispatch)
      if cf is not None:
        options["capacity_factor"] = cf
      row = {"num_experts": e, "dispatch": dispatch, "capacity_factor": cf}
      rows.append({**row, **measure("moe", options)})
      print(f"{_row_name(rows[-1]):24s} done", flush=True)
  _table(rows)
  setup = {
    "top_k": FLAGS.top_k,
    "d_model": FLAGS.d_model,
    "num_layers": FLAGS.num_layers,
    "num_heads": FLAGS.num_heads,
    "vocab": FLAGS.vocab,
    "batch": FLAGS.batch,
    "seq_len": FLAGS.seq_len,
    "dtype": "float32",
    "backend": jax.default_backend(),
    "flops_source": "XLA cost_analysis of the compiled program, layers unrolled",
  }
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "moe.json"), "w") as f:
    json.dump({"setup": setup, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
