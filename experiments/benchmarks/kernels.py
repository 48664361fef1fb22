"""Pallas kernels against their XLA references: FLOPs, HBM bytes, rooflines and the TPU compiler's
estimated time, with no accelerator needed.

  JAX_PLATFORMS=cpu python -m experiments.benchmarks.kernels [--topologies=v5e:2x2,v6e:2x2]
      [--ops=flash,quant,ragged,paged]

For each kernel (`kernels_pallas`) and a few production-like shapes this reports
  - model FLOPs (the useful work: causal attention counts the visible half, a grouped matmul one
    product per row) and the minimum HBM bytes (every input read once, every output written once:
    `pl.estimate_cost` of the XLA reference), their ratio (arithmetic intensity), and the roofline
    time max(FLOPs / peak, bytes / bandwidth) for TPU v5e / v5p / v6e and H100 (`PEAKS`);
  - the kernel's own `pl.CostEstimate` (the work its tiling really does: re-read tiles, whole
    tiles on the causal diagonal or across expert boundaries), read back from the TPU lowering;
  - the TPU compiler's static estimate (`cost_analysis()["optimal_seconds"]` of a real libtpu
    compile for the topology, no chip needed) of the kernel and of its XLA reference
    (`jax.nn.dot_product_attention`, dequantize-then-dot, `jax.lax.ragged_dot`, gather + dense
    attention) compiled for the same chip. libtpu reports each `ConcatBitcast` custom call in the
    optimised HLO as -1 s ("unknown"); `xla_estimate` adds those back. XLA counts a while-loop body
    once, so a reference whose HLO has loops is flagged ("loop") and under-estimated.
Where a TPU or GPU is the default backend, every case is also timed (kernel with
implementation="auto" vs reference, median of `--repeats`) next to the same compiler estimate for
that device. CPU timings are never reported (the kernels only run in interpret mode there).
Writes results/kernels.json.
"""

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import time

# Published per-chip peaks: dense bfloat16 FLOP/s and HBM bytes/s. Sources: Google Cloud TPU docs
# (cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 819 GB/s; /v5p: 459 TFLOP/s, 2765 GB/s; /v6e:
# 918 TFLOP/s, 1638 GB/s) and NVIDIA's H100 SXM5 datasheet (989 TFLOP/s dense bf16 -- 1979 is
# with 2:4 sparsity -- and 3.35 TB/s HBM3).
PEAKS = {
  "v5e": (197e12, 819e9),
  "v5p": (459e12, 2765e9),
  "v6e": (918e12, 1638e9),
  "H100": (989e12, 3350e9),
}


# ------------------------------------------------------------------------- cost-model helpers


@dataclasses.dataclass(frozen=True)
class Cost:
  flops: int
  transcendentals: int
  bytes_accessed: int


def kernel_costs(fn, args) -> dict[str, Cost]:
  """The `pl.CostEstimate` of each TPU kernel in jit(fn)(*args), read back from the TPU lowering
  (what XLA receives), summed per kernel name."""
  import jax

  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  costs: dict[str, Cost] = {}
  for line in text.splitlines():
    if "@tpu_custom_call" not in line:
      continue
    name = re.search(r'kernel_name = "(\w+)"', line).group(1)
    get = lambda key: int(re.search(key + r"\\22:(\d+)", line).group(1))  # noqa: B023
    old = costs.get(name, Cost(0, 0, 0))
    costs[name] = Cost(
      old.flops + get("flops"),
      old.transcendentals + get("transcendentals"),
      old.bytes_accessed + get("bytes_accessed"),
    )
  return costs


def total(costs: dict[str, Cost]) -> Cost:
  return Cost(*(sum(getattr(c, f) for c in costs.values()) for f in Cost.__dataclass_fields__))


def tpu_device(topology: str):
  """The first chip of a TPU topology description (libtpu; no TPU needed)."""
  from jax.experimental import topologies

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compiling needs no chip lock.
  return topologies.get_topology_desc(topology, platform="tpu").devices[0]


def compile_for(device, fn, args):
  """jit(fn) compiled by libtpu for one chip, args as ShapeDtypeStructs."""
  import jax
  import numpy as np

  sharding = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("x",))):
    return jax.jit(fn).trace(*args).lower().compile()


def xla_estimate(compiled) -> dict:
  """XLA's static cost model of a compiled program: optimal_seconds (ConcatBitcast-corrected),
  flops, bytes accessed, and how many while loops (bodies counted once) the HLO has."""
  from reslm.parallel import aot

  cost = aot.cost(compiled)
  text = compiled.as_text()
  return {
    "optimal_seconds": cost["optimal_seconds"] or 0.0,
    "flops": cost["flops"] or 0.0,
    "bytes": cost["bytes_accessed"] or 0.0,
    "concat_bitcasts": text.count('custom_call_target="ConcatBitcast"'),
    "while_loops": len(re.findall(r"\bwhile\(", text)),
  }


def roofline(flops: float, nbytes: float, chip: str) -> float:
  peak, bandwidth = PEAKS[chip]
  return max(flops / peak, nbytes / bandwidth)


# ------------------------------------------------------------------------------------ the cases


@dataclasses.dataclass(frozen=True)
class Case:
  """One op at one shape: kernel and XLA reference on the same inputs."""

  op: str
  label: str
  kernel: object  # fn(*args, implementation=...) -> output
  reference: object  # fn(*args) -> output, plain XLA
  make: object  # key -> concrete inputs (only materialised when timing on a device)
  model_flops: int


def _normal(key, shape, dtype):
  import jax

  return jax.random.normal(key, shape).astype(dtype)


def _flash_cases():
  import jax
  import jax.numpy as jnp

  from reslm.kernels_pallas.flash_attention import flash_attention

  def make(b, s, h, hk, d):
    def inputs(key):
      kq, kk, kv = jax.random.split(key, 3)
      q = _normal(kq, (b, s, h, d), jnp.bfloat16)
      return q, _normal(kk, (b, s, hk, d), jnp.bfloat16), _normal(kv, (b, s, hk, d), jnp.bfloat16)

    return inputs

  def forward(q, k, v, implementation="tpu"):
    return flash_attention(q, k, v, causal=True, implementation=implementation)

  def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

  def train(attend):
    def step(q, k, v, **kw):
      loss = lambda *a: attend(*a, **kw).astype(jnp.float32).sum()
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return step

  for b, s, h, hk, d in ((1, 2048, 32, 8, 128), (1, 8192, 32, 8, 128)):
    fwd = 4 * b * h * d * s * (s + 1) // 2  # Causal: query i sees i + 1 keys.
    label = f"B{b} S{s} h{h}/{hk} d{d} causal"
    yield Case("flash fwd", label, forward, reference, make(b, s, h, hk, d), fwd)
  b, s, h, hk, d = 1, 4096, 32, 8, 128
  fwd = 4 * b * h * d * s * (s + 1) // 2
  label = f"B{b} S{s} h{h}/{hk} d{d} causal"  # Backward = 2x forward (dQ, dK, dV, dP).
  yield Case(
    "flash fwd+bwd", label, train(forward), train(reference), make(b, s, h, hk, d), 3 * fwd
  )


def _quant_cases():
  import jax
  import jax.numpy as jnp
  from jax import lax

  from reslm.kernels_pallas.quant_matmul import (
    int4_matmul,
    int8_int8_matmul,
    int8_matmul,
    unpack_int4,
  )

  k_dim = n_dim = 4096
  f32 = jnp.float32

  def make(m, kind):
    def inputs(key):
      kx, kw, ks = jax.random.split(key, 3)
      rows = k_dim // 2 if kind == "int4" else k_dim
      w = jax.random.randint(kw, (rows, n_dim), -128, 128, jnp.int8)
      if kind == "w8a8":
        x = jax.random.randint(kx, (m, k_dim), -127, 128, jnp.int8)
        return x, w, jax.random.uniform(ks, (m,), f32), jax.random.uniform(ks, (n_dim,), f32)
      scales = (k_dim // 128, n_dim) if kind == "int4" else (n_dim,)
      return _normal(kx, (m, k_dim), jnp.bfloat16), w, jax.random.uniform(ks, scales, f32) / 64

    return inputs

  def dot(x, w):  # bfloat16 MXU product with float32 accumulation, as the kernels do.
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=f32).astype(x.dtype)

  kernels = {
    "int8": (
      lambda x, w, s, implementation="tpu": int8_matmul(x, w, s, implementation=implementation),
      lambda x, w, s: dot(x, w.astype(f32) * s),
    ),
    "int4": (
      lambda x, w, s, implementation="tpu": int4_matmul(
        x, w, s, group_size=128, implementation=implementation
      ),
      lambda x, w, s: dot(x, unpack_int4(w).astype(f32) * jnp.repeat(s, 128, axis=0)),
    ),
    "w8a8": (
      lambda x, w, xs, ws, implementation="tpu": int8_int8_matmul(
        x, w, xs, ws, implementation=implementation
      ),
      lambda x, w, xs, ws: (
        lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        * xs[:, None]
        * ws
      ),
    ),
  }
  for kind, m in (("int8", 16), ("int8", 2048), ("int4", 16), ("int4", 2048), ("w8a8", 2048)):
    kernel, reference = kernels[kind]
    name = {"int8": "int8 (per-channel)", "int4": "int4 g128", "w8a8": "w8a8"}[kind]
    label = f"M{m} K{k_dim} N{n_dim}" + (" decode" if m <= 64 else "")
    yield Case(name, label, kernel, reference, make(m, kind), 2 * m * k_dim * n_dim)


def _ragged_cases():
  import jax
  import jax.numpy as jnp

  from reslm.kernels_pallas.ragged_matmul import ragged_matmul

  def make(m, k, n, g):
    def inputs(key):
      kx, kw, ks = jax.random.split(key, 3)
      cuts = jnp.sort(jax.random.randint(ks, (g - 1,), 0, m + 1))  # Random routing.
      sizes = jnp.diff(jnp.concatenate([jnp.zeros(1, int), cuts, jnp.full(1, m)]))
      return _normal(kx, (m, k), jnp.bfloat16), _normal(kw, (g, k, n), jnp.bfloat16), sizes

    return inputs

  def kernel(lhs, rhs, sizes, implementation="tpu"):
    return ragged_matmul(lhs, rhs, sizes.astype(jnp.int32), implementation=implementation)

  def reference(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes.astype(jnp.int32))

  # (tokens x top_k, d_model, expert width, experts): fine-grained 64 experts, Mixtral-like 8.
  for m, k, n, g in ((8192, 4096, 1408, 64), (16384, 4096, 14336, 8)):
    label = f"M{m} K{k} N{n} G{g}"
    yield Case("ragged (MoE)", label, kernel, reference, make(m, k, n, g), 2 * m * k * n)


def _paged_reference(q, k_pages, v_pages, lengths, tables, *scales):
  """Gather the pages into a dense [batch, kv_heads, tokens, d] cache, then masked attention."""
  import jax
  import jax.numpy as jnp

  b, h, d = q.shape
  hk, _, ps, _ = k_pages.shape

  def gather(pages, scale):
    x = pages[:, tables]  # [kv_heads, b, pages_per_seq, page_size, d]
    if scale is not None:
      x = (x.astype(jnp.float32) * scale[:, tables][..., None]).astype(q.dtype)
    return jnp.swapaxes(x.reshape(hk, b, -1, d), 0, 1)

  k_scale, v_scale = scales or (None, None)
  k, v = gather(k_pages, k_scale), gather(v_pages, v_scale)
  s = jnp.einsum(
    "bhgd,bhtd->bhgt", q.reshape(b, hk, h // hk, d), k, preferred_element_type=jnp.float32
  )
  valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
  s = jnp.where(valid[:, None, None], s * d**-0.5, -1e30)
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  out = jnp.einsum("bhgt,bhtd->bhgd", p, v, preferred_element_type=jnp.float32)
  return out.reshape(b, h, d).astype(q.dtype)


def _paged_cases():
  import jax
  import jax.numpy as jnp

  from reslm.kernels_pallas.paged_attention import paged_attention

  def make(b, h, hk, d, ps, pps, dtype):
    def inputs(key):
      kq, kk, kv, kt = jax.random.split(key, 4)
      pool = (hk, b * pps, ps, d)  # The pool holds exactly every sequence's pages.
      if dtype == jnp.int8:
        k = jax.random.randint(kk, pool, -127, 128, jnp.int8)
        v = jax.random.randint(kv, pool, -127, 128, jnp.int8)
      else:
        k, v = _normal(kk, pool, dtype), _normal(kv, pool, dtype)
      tables = jax.random.permutation(kt, b * pps).reshape(b, pps).astype(jnp.int32)
      args = [_normal(kq, (b, h, d), jnp.bfloat16), k, v, jnp.full((b,), pps * ps), tables]
      if dtype == jnp.int8:
        args += [jnp.full(pool[:3], 0.02, jnp.float32)] * 2
      return tuple(args)

    return inputs

  def kernel(q, k, v, lengths, tables, *scales, implementation="tpu"):
    k_scale, v_scale = scales or (None, None)
    return paged_attention(
      q, k, v, lengths, tables, k_scale=k_scale, v_scale=v_scale, implementation=implementation
    )

  for b, h, hk, d, ps, pps, dtype in (
    (64, 32, 8, 128, 32, 128, jnp.bfloat16),  # 64 sequences x 4096 cached tokens, GQA 4.
    (64, 32, 8, 128, 32, 128, jnp.int8),
  ):
    label = f"B{b} h{h}/{hk} d{d} L{ps * pps} {jnp.dtype(dtype).name}"
    flops = 4 * b * h * ps * pps * d
    yield Case(
      "paged decode", label, kernel, _paged_reference, make(b, h, hk, d, ps, pps, dtype), flops
    )


CASES = {
  "flash": _flash_cases,
  "quant": _quant_cases,
  "ragged": _ragged_cases,
  "paged": _paged_cases,
}


# ------------------------------------------------------------------------------------- measuring


def _abstract(case: Case):
  import jax

  return jax.eval_shape(case.make, jax.random.key(0))


def _describe(case: Case, topologies: list[str]) -> dict:
  from jax.experimental import pallas as pl

  args = _abstract(case)
  minimum = pl.estimate_cost(case.reference, *args).bytes_accessed
  est = total(kernel_costs(case.kernel, args))
  row = {
    "op": case.op,
    "shape": case.label,
    "model_flops": case.model_flops,
    "min_bytes": int(minimum),
    "intensity": case.model_flops / minimum,
    "roofline_us": {c: roofline(case.model_flops, minimum, c) * 1e6 for c in PEAKS},
    "kernel_estimate": dataclasses.asdict(est),
    "xla": {},
  }
  for topology in topologies:
    device = tpu_device(topology)
    entry = {}
    for name, fn in (("kernel", case.kernel), ("reference", case.reference)):
      start = time.time()
      try:
        entry[name] = xla_estimate(compile_for(device, fn, args))
      except Exception as err:  # An XLA reference may not fit the chip (HBM OOM): report it.
        entry[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
      entry[name]["compile_s"] = round(time.time() - start, 2)
    row["xla"][topology] = entry
  return row


def _time(fn, args, repeats: int) -> float:
  import jax

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def _measure_on_device(case: Case, repeats: int) -> dict:
  """Kernel ("auto") vs reference on the default device, with the compiler's estimate for it."""
  import jax

  args = jax.block_until_ready(case.make(jax.random.key(0)))
  out = {}
  for name, fn in (
    ("kernel", functools.partial(case.kernel, implementation="auto")),
    ("reference", case.reference),
  ):
    jitted = jax.jit(fn)
    out[name] = {
      "measured_us": _time(jitted, args, repeats) * 1e6,
      "xla_estimate_us": xla_estimate(jitted.lower(*args).compile())["optimal_seconds"] * 1e6,
    }
  return out


def _fmt_us(entry: dict | None) -> str:
  if not entry or "error" in entry:
    return "fail"
  flag = "*" if entry["while_loops"] else ""
  return f"{entry['optimal_seconds'] * 1e6:.1f}{flag}"


def print_table(rows, topologies):
  head = f"{'op':20s} {'shape':30s} {'GFLOP':>8s} {'MB min':>8s} {'AI':>6s} " + " ".join(
    f"{c + ' us':>9s}" for c in PEAKS
  )
  head += f" {'kern GF':>8s} {'kern MB':>8s}"
  for t in topologies:
    head += f" {t.split(':')[0] + ' kern/ref us':>24s}"
  print(head)
  for r in rows:
    est = r["kernel_estimate"]
    line = (
      f"{r['op']:20s} {r['shape']:30s} {r['model_flops'] / 1e9:8.2f} {r['min_bytes'] / 1e6:8.1f} "
      f"{r['intensity']:6.0f} " + " ".join(f"{r['roofline_us'][c]:9.1f}" for c in PEAKS)
    )
    line += f" {est['flops'] / 1e9:8.2f} {est['bytes_accessed'] / 1e6:8.1f}"
    for t in topologies:
      x = r["xla"].get(t, {})
      line += f" {_fmt_us(x.get('kernel')) + ' / ' + _fmt_us(x.get('reference')):>24s}"
    if "device" in r:
      d = r["device"]
      line += "  measured kern/ref us: {:.1f} / {:.1f} (XLA est {:.1f} / {:.1f})".format(
        d["kernel"]["measured_us"], d["reference"]["measured_us"],
        d["kernel"]["xla_estimate_us"], d["reference"]["xla_estimate_us"],
      )  # fmt: skip
    print(line)
  print(
    "roofline = max(model FLOPs / peak, min bytes / HBM BW); kern GF/MB = the kernel's own "
    "CostEstimate; * = the HLO has while loops (bodies counted once; in the ragged kernel's "
    "program it is the visit-list search, negligible)"
  )


def main(argv):
  del argv
  import jax
  from absl import flags

  flags_ = flags.FLAGS
  topologies = list(flags_.topologies)
  if topologies and importlib.util.find_spec("libtpu") is None:
    print("libtpu is not installed (pip install 'jax[tpu]'): no TPU compiler estimates")
    topologies = []
  rows = []
  on_device = jax.default_backend() in ("tpu", "gpu")
  for op in flags_.ops:
    for case in CASES[op]():
      start = time.time()
      row = _describe(case, topologies)
      if on_device:
        row["device"] = _measure_on_device(case, flags_.repeats)
      print(f"  {case.op} {case.label}: {time.time() - start:.1f}s", flush=True)
      rows.append(row)
  print_table(rows, topologies)
  setup = {
    "jax": jax.__version__,
    "libtpu": importlib.metadata.version("libtpu") if topologies else None,
    "topologies": topologies,
    "peaks_flops_bytes_per_s": PEAKS,
    "backend": jax.default_backend(),
    "timed": on_device,
  }
  os.makedirs(flags_.out, exist_ok=True)
  with open(os.path.join(flags_.out, "kernels.json"), "w") as f:
    json.dump({"setup": setup, "results": rows}, f, indent=2)


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_list(
    "topologies", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"], "libtpu topologies to compile for."
  )
  flags.DEFINE_list("ops", list(CASES), "Ops to run: " + ", ".join(CASES))
  flags.DEFINE_integer("repeats", 20, "Timed runs per case on a TPU/GPU (median reported).")
  flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Output dir.")
  app.run(main)
