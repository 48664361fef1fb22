"""Tests for analytic FLOPs (vs hand counts and XLA) and XLA cost / memory analysis."""

import jax
import jax.numpy as jnp
import pytest

from reslm.metrics import flops

# A tiny GQA config used for the hand count.
TINY = dict(
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  vocab_size=100,
  seq_len=16,
)


def _matmul(m, n, k):
  """FLOPs of an (m, k) @ (k, n) matmul."""
  return 2 * m * n * k


def _hand_count_per_sequence(cfg, mlp_matrices, causal, lm_head=True):
  """Counts every matmul over one full sequence of T tokens, independently of the module."""
  t, d = cfg["seq_len"], cfg["d_model"]
  h, kv, hd, f = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["mlp_dim"]
  per_layer = (
    _matmul(t, h * hd, d)  # q
    + _matmul(t, kv * hd, d)  # k
    + _matmul(t, kv * hd, d)  # v
    + _matmul(t, d, h * hd)  # o
    + h * _matmul(t, t, hd)  # scores, each head: (T, hd) @ (hd, T)
    + h * _matmul(t, hd, t)  # AV, each head: (T, T) @ (T, hd)
    + mlp_matrices * _matmul(t, f, d)  # MLP matrices, all D×F-sized
  )
  if causal:
    # Only the lower triangle of the score / AV matmuls is needed.
    per_layer -= (h * _matmul(t, t, hd) + h * _matmul(t, hd, t)) // 2
  return cfg["num_layers"] * per_layer + (_matmul(t, cfg["vocab_size"], d) if lm_head else 0)


@pytest.mark.parametrize("mlp_kind,mlp_matrices", [("swiglu", 3), ("gelu", 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_analytic_matches_hand_count(mlp_kind, mlp_matrices, causal):
  out = flops.transformer_flops_per_token(**TINY, mlp_kind=mlp_kind, causal=causal)
  expected = _hand_count_per_sequence(TINY, mlp_matrices, causal) / TINY["seq_len"]
  assert out["forward"] == expected
  assert out["train"] == 3 * expected


def test_analytic_literal_value():
  # Per layer: proj 2048+1024+1024+2048, causal attn 1024, swiglu 3·4096; head 6400.
  out = flops.transformer_flops_per_token(**TINY, mlp_kind="swiglu")
  assert out["forward"] == 2 * (6144 + 1024 + 12288) + 6400
  assert out["lm_head"] == 6400


def test_no_lm_head_and_bad_kind():
  with_head = flops.transformer_flops_per_token(**TINY, mlp_kind="gelu")
  without = flops.transformer_flops_per_token(**TINY, mlp_kind="gelu", include_lm_head=False)
  assert with_head["forward"] - without["forward"] == 2 * 32 * 100
  with pytest.raises(ValueError):
    flops.transformer_flops_per_token(**TINY, mlp_kind="relu")


def test_six_n():
  assert flops.six_n_flops_per_token(1000) == 6000.0


# A larger config for the XLA comparison, so matmuls dominate elementwise ops.
XLA_CFG = dict(
  num_layers=2,
  d_model=64,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  mlp_dim=256,
  vocab_size=512,
  seq_len=128,
)


def _init(cfg, key):
  d, h, kv = cfg["d_model"], cfg["num_heads"], cfg["num_kv_heads"]
  hd, f = cfg["head_dim"], cfg["mlp_dim"]
  layers = []
  for k in jax.random.split(key, cfg["num_layers"]):
    ks = jax.random.split(k, 7)
    layers.append(
      {
        "wq": jax.random.normal(ks[0], (d, h * hd)) * 0.1,
        "wk": jax.random.normal(ks[1], (d, kv * hd)) * 0.1,
        "wv": jax.random.normal(ks[2], (d, kv * hd)) * 0.1,
        "wo": jax.random.normal(ks[3], (h * hd, d)) * 0.1,
        "w_gate": jax.random.normal(ks[4], (d, f)) * 0.1,
        "w_up": jax.random.normal(ks[5], (d, f)) * 0.1,
        "w_down": jax.random.normal(ks[6], (f, d)) * 0.1,
      }
    )
  head = jax.random.normal(key, (d, cfg["vocab_size"])) * 0.1
  return layers, head


def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _forward(layers, head, x, *, num_heads, num_kv_heads, head_dim):
  """Bidirectional GQA + SwiGLU decoder, layers unrolled in Python (no XLA loops)."""
  t = x.shape[0]
  for p in layers:
    y = _rms(x)
    q = (y @ p["wq"]).reshape(t, num_kv_heads, num_heads // num_kv_heads, head_dim)
    k = (y @ p["wk"]).reshape(t, num_kv_heads, head_dim)
    v = (y @ p["wv"]).reshape(t, num_kv_heads, head_dim)
    scores = jnp.einsum("qgrd,kgd->grqk", q, k) / head_dim**0.5
    probs = jax.nn.softmax(scores, axis=-1)
    attn = jnp.einsum("grqk,kgd->qgrd", probs, v).reshape(t, num_heads * head_dim)
    x = x + attn @ p["wo"]
    y = _rms(x)
    x = x + (jax.nn.silu(y @ p["w_gate"]) * (y @ p["w_up"])) @ p["w_down"]
  return _rms(x) @ head


def test_analytic_matches_xla_cost_analysis():
  cfg = XLA_CFG
  layers, head = _init(cfg, jax.random.key(0))
  x = jnp.ones((cfg["seq_len"], cfg["d_model"]))
  fwd = jax.jit(
    lambda layers, head, x: _forward(
      layers,
      head,
      x,
      num_heads=cfg["num_heads"],
      num_kv_heads=cfg["num_kv_heads"],
      head_dim=cfg["head_dim"],
    )
  )
  compiled = fwd.lower(layers, head, x).compile()
  xla = flops.xla_cost(compiled)
  # The test layer computes full (unmasked) attention, so compare with the bidirectional count.
  analytic = flops.transformer_flops_per_token(**cfg, mlp_kind="swiglu", causal=False)
  expected = analytic["forward"] * cfg["seq_len"]
  assert xla["flops"] == pytest.approx(expected, rel=0.1)
  assert xla["bytes_accessed"] > 0


class _FakeCompiled:
  def __init__(self, cost=None, raises=False):
    self._cost, self._raises = cost, raises

  def cost_analysis(self):
    if self._raises:
      raise NotImplementedError
    return self._cost

  def memory_analysis(self):
    return None


@pytest.mark.parametrize(
  "compiled",
  [None, _FakeCompiled(None), _FakeCompiled([]), _FakeCompiled(raises=True)],
)
def test_xla_cost_missing(compiled):
  assert flops.xla_cost(compiled) == {
    "flops": None,
    "bytes_accessed": None,
    "optimal_seconds": None,
  }


def test_xla_cost_list_of_dicts_and_negative():
  fake = _FakeCompiled([{"flops": 10.0, "bytes accessed": 4.0, "optimal_seconds": -1.0}])
  assert flops.xla_cost(fake) == {"flops": 10.0, "bytes_accessed": 4.0, "optimal_seconds": None}


def test_memory_analysis_compiled():
  f = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b.T + jnp.sin(a).sum())
  a = jnp.ones((64, 32))
  b = jnp.ones((32, 48))
  mem = flops.memory_analysis(f.lower(a, b).compile())
  keys = {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes"}
  assert set(mem) == keys | {"peak_bytes"}
  assert all(isinstance(mem[k], int) for k in mem)
  assert mem["argument_bytes"] == (64 * 32 + 32 * 48) * 4
  assert mem["output_bytes"] == 64 * 32 * 4
  assert mem["peak_bytes"] >= mem["temp_bytes"]
  assert mem["peak_bytes"] == (
    mem["argument_bytes"]
    + mem["output_bytes"]
    - mem["alias_bytes"]
    + mem["temp_bytes"]
    + mem["generated_code_bytes"]
  )


def test_memory_analysis_missing():
  for compiled in (None, _FakeCompiled()):
    assert all(v is None for v in flops.memory_analysis(compiled).values())
