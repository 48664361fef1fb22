"""W8A8 on this CPU: int8 x int8 -> int32 matmul (XLA dot_general) against the float32 matmul.

  python -m experiments.benchmarks.quant_matmul [--shapes=512x512x512,...] [--repeats=7]

The compression issue expects W8A8 int8 matmuls to be >= 2x faster than float32 on this CPU for
larger layers. For each shape M x K x N this times, in one process:
  - f32:        jnp.matmul of float32 [M, K] x [K, N] (the baseline),
  - int8:       lax.dot_general of int8 x int8 with preferred_element_type=int32 (the reference path
                of `kernels_pallas.quant_matmul.int8_int8_matmul` and its CPU fallback),
  - w8a8:       the whole W8A8 layer on float32 x: per-row int8 quantization of x (amax, round,
                clip), the int8 dot, and the row/column scaling back to float32
                (`quantize_rows_int8` + `int8_int8_matmul(..., implementation="reference")`),
  - bf16:       jnp.matmul of bfloat16 inputs with float32 accumulation, for context.
Every variant is compiled once, checked (the int8 result must equal an int64 numpy product on a
small slice), then timed round-robin (one call of each variant per round, `--repeats` rounds) so
the noise of the shared machine hits all alike; medians and min are reported, with the ratio
f32 / variant. Writes results/quant_matmul.json. CPU timings only: nothing here measures a Pallas
kernel (those run on TPU/GPU).
"""

import json
import os
import platform
import time

from absl import app, flags

flags.DEFINE_list(
  "shapes",
  [
    "512x512x512",
    "1024x1024x1024",
    "2048x2048x2048",
    "4096x4096x4096",
    "16x4096x4096",  # Decode: a few tokens through a 4096-wide projection.
    "512x4096x11008",  # LM MLP up-projection on a 512-token chunk (7B-class widths).
    "512x11008x4096",  # ... and the down-projection.
  ],
  "Problems MxKxN.",
)
flags.DEFINE_integer("repeats", 7, "Timed rounds (median reported).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Output directory.")
FLAGS = flags.FLAGS

VARIANTS = ("f32", "int8", "w8a8", "bf16")


def matmul_variants(m: int, k: int, n: int):
  """{name: (jitted fn, args)} of f32, int8 x int8 -> int32, the whole W8A8 layer (activation
  quantization included) and bf16 for one [m, k] x [k, n] product, inputs already on device."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  from reslm.kernels_pallas.quant_matmul import int8_int8_matmul, quantize_int8, quantize_rows_int8

  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32)
  w_q, w_scale = quantize_int8(w)
  x_q, _ = quantize_rows_int8(x)

  def int8_dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)

  def w8a8(x, w_q, w_scale):
    x_q, x_scale = quantize_rows_int8(x)
    return int8_int8_matmul(x_q, w_q, x_scale, w_scale, implementation="reference")

  bf16 = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)
  variants = {
    "f32": (jax.jit(jnp.matmul), (x, w)),
    "int8": (jax.jit(int8_dot), (x_q, w_q)),
    "w8a8": (jax.jit(w8a8), (x, w_q, w_scale)),
    "bf16": (jax.jit(bf16), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))),
  }
  return {name: (fn, jax.block_until_ready(args)) for name, (fn, args) in variants.items()}


def _check(variants):
  """The int8 dot is exact: compare a corner with int64 numpy; W8A8 tracks f32 (quantization
  error only)."""
  import numpy as np

  fn, (x_q, w_q) = variants["int8"]
  got = np.asarray(fn(x_q, w_q))[:8, :8]
  want = np.asarray(x_q[:8], np.int64) @ np.asarray(w_q[:, :8], np.int64)
  np.testing.assert_array_equal(got, want)
  fn, args = variants["f32"]
  exact = np.asarray(fn(*args))
  fn, args = variants["w8a8"]
  rel = np.abs(np.asarray(fn(*args)) - exact).max() / np.abs(exact).max()
  return float(rel)


def _measure(shape: tuple[int, int, int]) -> dict:
  import numpy as np

  m, k, n = shape
  variants = matmul_variants(m, k, n)
  for fn, args in variants.values():  # Compile and warm up.
    fn(*args).block_until_ready()
  rel = _check(variants)
  times = {name: [] for name in variants}
  for _ in range(FLAGS.repeats):
    for name, (fn, args) in variants.items():
      t0 = time.perf_counter()
      fn(*args).block_until_ready()
      times[name].append(time.perf_counter() - t0)
  flops = 2 * m * k * n
  row = {"m": m, "k": k, "n": n, "flops": flops, "w8a8_max_rel_error_vs_f32": rel}
  for name, ts in times.items():
    med = float(np.median(ts))
    row[name] = {"median_s": med, "min_s": float(min(ts)), "gops_per_s": flops / med / 1e9}
  f32 = row["f32"]["median_s"]
  row["speedup_vs_f32"] = {name: f32 / row[name]["median_s"] for name in VARIANTS if name != "f32"}
  return row


def _table(rows):
  head = f"{'M x K x N':>18s} " + " ".join(f"{v + ' ms':>10s}" for v in VARIANTS)
  head += f" {'f32/int8':>9s} {'f32/w8a8':>9s} {'f32/bf16':>9s}"
  print(head)
  for r in rows:
    line = f"{r['m']:>5d}x{r['k']:>5d}x{r['n']:>5d} " + " ".join(
      f"{r[v]['median_s'] * 1e3:10.2f}" for v in VARIANTS
    )
    s = r["speedup_vs_f32"]
    print(line + f" {s['int8']:9.2f} {s['w8a8']:9.2f} {s['bf16']:9.2f}")


def main(argv):
  del argv
  import jax

  shapes = [tuple(int(d) for d in s.split("x")) for s in FLAGS.shapes]
  rows = []
  for shape in shapes:
    rows.append(_measure(shape))
    r = rows[-1]
    print(
      f"{shape}: f32 {r['f32']['median_s'] * 1e3:.2f} ms, int8 {r['int8']['median_s'] * 1e3:.2f} ms "
      f"({r['speedup_vs_f32']['int8']:.2f}x), w8a8 {r['speedup_vs_f32']['w8a8']:.2f}x",
      flush=True,
    )
  _table(rows)
  setup = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "cpu": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "load_average_at_end": os.getloadavg(),
    "repeats": FLAGS.repeats,
    "timing": "round-robin over variants, median of repeats; machine shared with other jobs",
  }
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "quant_matmul.json"), "w") as f:
    json.dump({"setup": setup, "results": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
