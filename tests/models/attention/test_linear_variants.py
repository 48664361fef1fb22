"""Linear-family attention (linear, efficient, AFT): closed forms, gradients, decoding, scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reslm.models.attention.aft  # noqa: F401  (registers "aft")
import reslm.models.attention.efficient  # noqa: F401  (registers "efficient")
import reslm.models.attention.linear  # noqa: F401  (registers "linear")
from reslm.models import MIXERS, ModelConfig, build_model
from reslm.models.attention.aft import AFTAttention
from reslm.models.attention.base import reference_attention
from reslm.models.attention.efficient import EfficientAttention, causal_efficient_attention
from reslm.models.attention.linear import LinearAttention, causal_linear_attention
from tests.models.mixer_checks import (
  check_causal_and_decoding,
  check_one_line_error,
  check_state_size_is_constant,
  logits,
  randomised,
  tokens,
)

B, T, H, D = 2, 11, 4, 8  # T = 11 is not a multiple of the chunk size 4.
TINY = dict(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)
VARIANTS = [
  ("linear", {"chunk_size": 4}),
  ("efficient", {"chunk_size": 4}),
  ("aft", {"variant": "simple"}),
  ("aft", {"variant": "full"}),
  ("aft", {"variant": "local", "window": 3}),
]
IDS = ["linear", "efficient", "aft-simple", "aft-full", "aft-local"]


def qkv(g, seed=0, t=T, scale=1.0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, t, H, D))
  k = scale * jax.random.normal(keys[1], (B, t, g, D))
  v = jax.random.normal(keys[2], (B, t, g, D))
  return q, k, v


def visible(causal, t=T, valid=None):
  """[b, t, s]: which keys each query may see."""
  mask = np.tril(np.ones((t, t), bool)) if causal else np.ones((t, t), bool)
  mask = np.broadcast_to(mask, (B, t, t))
  return jnp.asarray(mask if valid is None else mask & np.asarray(valid)[:, None, :])


def rep(x):
  """kv heads -> query heads (query head i uses kv head i // group)."""
  return jnp.repeat(x, H // x.shape[2], axis=2)


# Naive closed forms, written directly from the definitions with explicit [t, s] matrices.
def naive_linear(q, k, v, mask):
  phi = lambda x: jax.nn.elu(x) + 1
  a = jnp.einsum("bthd,bshd->bhts", phi(q), phi(rep(k))) * mask[:, None]
  return jnp.einsum("bhts,bshd->bthd", a / a.sum(-1, keepdims=True), rep(v))


def naive_efficient(q, k, v, mask):
  logits = jnp.where(mask[:, :, :, None, None], rep(k)[:, None], -jnp.inf)  # [b, t, s, h, d]
  rk = jax.nn.softmax(logits, axis=2)  # Per query: softmax over its visible keys, per feature.
  return jnp.einsum("bthf,btshf,bshe->bthe", jax.nn.softmax(q, -1), rk, rep(v))


def naive_aft(q, k, v, w, mask):
  e = jnp.exp(rep(k)[:, None] + w[None, :, :, None, None]) * mask[:, :, :, None, None]
  y = jnp.einsum("btshd,bshd->bthd", e, rep(v)) / e.sum(2)
  return jax.nn.sigmoid(q) * y


def module(name, causal, g, **options):
  cls = {"linear": LinearAttention, "efficient": EfficientAttention, "aft": AFTAttention}[name]
  return cls(32, H, g, D, causal=causal, rope_theta=None, rngs=nnx.Rngs(0), **options)


def check_forward_and_vjp(f, ref, args, atol=2e-5):
  """Outputs and input cotangents (jax.vjp) of `f` equal those of the naive `ref`."""

  @jax.jit
  def both(args):
    results = []
    for fn in (f, ref):
      out, fn_vjp = jax.vjp(fn, *args)
      results.append((out, fn_vjp(jax.random.normal(jax.random.key(7), out.shape))))
    return results

  (out, grads), (ref_out, ref_grads) = both(args)
  np.testing.assert_allclose(out, ref_out, atol=atol, rtol=1e-4)
  for a, b in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4)


def check_closed_form(mod, naive, g, causal, padded):
  """mix(q, k, v) of `mod` vs `naive(q, k, v, mask)`: outputs and gradients, on real rows.

  With `padded`, the second sequence ends in 4 padding tokens (segment id 0) whose keys must not
  contribute; padded query rows are left out of the comparison.
  """
  seg = jnp.array([[1] * T, [1] * (T - 4) + [0] * 4]) if padded else None
  real = jnp.ones((B, T)) if seg is None else (seg != 0).astype(jnp.float32)
  mask = visible(causal, valid=None if seg is None else seg != 0)
  f = lambda q, k, v: mod.mix(q, k, v, segment_ids_bt=seg)[0] * real[:, :, None, None]
  ref = lambda q, k, v: naive(q, k, v, mask) * real[:, :, None, None]
  check_forward_and_vjp(f, ref, qkv(g))


# (causal, kv_heads, padded): GQA, multi-head and multi-query, with and without padding.
CASES = [(True, 2, False), (True, 4, True), (False, 1, False), (False, 2, True)]


@pytest.mark.parametrize(("causal", "g", "padded"), CASES)
def test_linear_matches_closed_form(causal, g, padded):
  mod = module("linear", causal, g, chunk_size=4)
  check_closed_form(mod, naive_linear, g, causal, padded)


@pytest.mark.parametrize(("causal", "g", "padded"), CASES)
def test_efficient_matches_closed_form(causal, g, padded):
  mod = module("efficient", causal, g, chunk_size=4)
  check_closed_form(mod, naive_efficient, g, causal, padded)


def test_efficient_causal_is_stable_for_widely_spread_keys():
  """Keys spread over ~±300 would overflow (or underflow to 0/0) without the running max."""
  q, k, v = qkv(2, scale=100.0)
  out = module("efficient", True, 2, chunk_size=4).mix(q, k, v)[0]
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out, naive_efficient(q, k, v, visible(True)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", ["full", "local", "simple"])
def test_aft_matches_double_sum(causal, variant):
  g, padded = (2, variant != "full") if causal else (1, variant != "local")
  mod = module("aft", causal, g, variant=variant, window=3, max_len=16)
  w = np.zeros((T, T), np.float32)
  if variant != "simple":
    mod.w[...] = jax.random.normal(jax.random.key(3), (16, 16))
    w = np.asarray(mod.w[...])[:T, :T]
    if variant == "local":
      near = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :]) < 3
      w = np.where(near, w, 0.0)
  naive = lambda q, k, v, mask: naive_aft(q, k, v, jnp.asarray(w), mask)
  check_closed_form(mod, naive, g, causal, padded)


def test_aft_simple_two_level_prefix_spans_many_chunks():
  from reslm.models.attention.aft import aft_simple

  t = 150  # Three 64-token chunks, the last one partial; keys spread widely.
  q, k, v = qkv(2, seed=4, t=t, scale=8.0)
  valid = jnp.arange(t)[None, :] != jnp.array([[5], [140]])  # One padded token per row.
  out, _ = aft_simple(q, k, v, causal=True, valid=valid)
  mask = visible(True, t, valid) & valid[:, :, None]
  expected = naive_aft(q, k, v, jnp.zeros((t, t)), mask)  # NaN (0/0) at the padded queries.
  expected = jnp.where(valid[:, :, None, None], expected, 0.0)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_aft_bias_gradient_matches_double_sum():
  """d/dw of AFT-local: zero outside the window and beyond the sequence, else the naive value."""
  mod = module("aft", True, 2, variant="local", window=3, max_len=16)
  mod.w[...] = jax.random.normal(jax.random.key(3), (16, 16))
  q, k, v = qkv(2)
  ct = jax.random.normal(jax.random.key(5), (B, T, H, D))
  grad = nnx.grad(lambda m: jnp.sum(m.mix(q, k, v)[0] * ct))(mod).w[...]
  near = jnp.abs(jnp.arange(T)[:, None] - jnp.arange(T)[None, :]) < 3

  def naive(w):
    return jnp.sum(naive_aft(q, k, v, jnp.where(near, w, 0.0), visible(True)) * ct)

  expected = np.zeros((16, 16), np.float32)
  expected[:T, :T] = jax.grad(naive)(mod.w[...][:T, :T])
  np.testing.assert_allclose(grad, expected, atol=2e-5, rtol=1e-4)


def tiny(name, options, **kw):
  return ModelConfig(**{**TINY, "mixer": name, "mixer_options": options, **kw})


def naive_rope(x, theta=10_000.0):
  """Rotates each pair (x[i], x[i + d/2]) at position p by p · θ^(-2i/d); x [b, t, h, d] NumPy."""
  x = np.asarray(x, np.float64)
  d = x.shape[-1]
  out = x.copy()
  for p in range(x.shape[1]):
    for i in range(d // 2):
      a = p * theta ** (-2 * i / d)
      u, w = x[:, p, :, i], x[:, p, :, i + d // 2]
      out[:, p, :, i], out[:, p, :, i + d // 2] = (
        u * np.cos(a) - w * np.sin(a),
        w * np.cos(a) + u * np.sin(a),
      )
  return out.astype(np.float32)


# Whole layers (projections, optional RoPE, core, output projection) vs the naive closed forms.
LAYER_CASES = [
  ("linear", {}, naive_linear),
  ("efficient", {}, naive_efficient),
  ("aft", {"variant": "simple"}, lambda q, k, v, m: naive_aft(q, k, v, jnp.zeros((T, T)), m)),
  ("aft", {"variant": "full"}, None),  # The learned biases w, read from the layer.
]


@pytest.mark.parametrize("rope", [None, True], ids=["default", "rope"])
@pytest.mark.parametrize(("name", "options", "naive"), LAYER_CASES, ids=IDS[:4])
def test_layer_applies_rope_only_when_asked(name, options, naive, rope):
  """RoPE rotates q and k before the feature maps only with rope=True (default: no RoPE)."""
  extra = {} if rope is None else {"rope": rope}
  cfg = tiny(name, {**options, **extra, "chunk_size": 4} if name != "aft" else {**options, **extra})
  layer = randomised(lambda: MIXERS.build(name, cfg, causal=True, rngs=nnx.Rngs(0)), std=0.3)
  x = np.random.default_rng(1).standard_normal((B, T, 32)).astype(np.float32)
  proj = lambda m: np.einsum("btc,chd->bthd", x, np.asarray(m.kernel[...]))  # noqa: E731
  q, k, v = proj(layer.q), proj(layer.k), proj(layer.v)
  if rope:
    q, k = naive_rope(q), naive_rope(k)
  if naive is None:
    w = jnp.asarray(np.asarray(layer.w[...])[:T, :T])
    naive = lambda q, k, v, m: naive_aft(q, k, v, w, m)  # noqa: E731
  core = np.asarray(naive(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), visible(True)))
  expected = np.einsum("bthd,hdc->btc", core, np.asarray(layer.o.kernel[...]))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  out = np.asarray(jax.jit(lambda x: layer(x, positions_bt=pos)[0])(jnp.asarray(x)))
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
  if rope:  # The rotation matters at these scales: the test could tell the two apart.
    plain = naive(*(jnp.asarray(a) for a in (proj(layer.q), proj(layer.k), v)), visible(True))
    plain = np.einsum("bthd,hdc->btc", np.asarray(plain), np.asarray(layer.o.kernel[...]))
    assert np.abs(plain - expected).max() > 1e-2


@pytest.mark.parametrize(("name", "options"), VARIANTS[:4], ids=IDS[:4])
def test_encoder_padding_does_not_change_real_tokens(name, options):
  model = build_model(tiny(name, options, kind="encoder"))
  x = tokens(t=12)
  seg = jnp.array([[1] * 12, [1] * 8 + [0] * 4])
  padded = logits(model, x, seg)
  np.testing.assert_allclose(padded[1, :8], logits(model, x[1:, :8])[0], atol=2e-5, rtol=1e-5)
  assert not np.allclose(logits(model, x)[1, :8], padded[1, :8])  # The padding was visible.


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_causal_and_decoding_equals_full_forward(name, options):
  """No future token leaks through the model, and prefill + one-token steps match the full pass."""
  check_causal_and_decoding(build_model(tiny(name, options)), prefills=(6,))


@pytest.mark.parametrize(("name", "options"), VARIANTS[:3], ids=IDS[:3])
def test_recurrent_state_size_does_not_depend_on_max_len(name, options):
  check_state_size_is_constant(build_model(tiny(name, options)))


@pytest.mark.parametrize(
  ("name", "options", "match"),
  [
    ("linear", {"chunk_size": 0}, r"model.mixer_options.chunk_size=0 .*positive integer"),
    ("efficient", {"chunk_size": -2}, r"model.mixer_options.chunk_size=-2 .*positive integer"),
    ("aft", {"variant": "huge"}, r"model.mixer_options.variant='huge' .*full, local, simple"),
    ("aft", {"variant": "local", "window": 0}, r"model.mixer_options.window=0 .*positive"),
    ("aft", {"max_len": 0}, r"model.mixer_options.max_len=0 .*positive"),
    (
      "linear",
      {"chunk": 8},
      r"model.mixer_options.chunk is not a setting of sequence mixer 'linear'",
    ),
    ("aft", {"windw": 8}, r"model.mixer_options.windw is not a setting of sequence mixer 'aft'"),
    ("linear", {"rope": 1}, r"model.mixer_options.rope=1 is not allowed for linear: True or"),
    ("efficient", {"rope": "yes"}, r"model.mixer_options.rope='yes' .*True or False"),
    ("aft", {"rope": None}, r"model.mixer_options.rope=None .*True or False"),
  ],
)
def test_bad_settings_raise_one_line_errors(name, options, match):
  check_one_line_error(lambda: build_model(tiny(name, options)), match)


@pytest.mark.parametrize("fn", [causal_linear_attention, causal_efficient_attention])
def test_causal_memory_grows_linearly_while_dense_grows_quadratically(fn):
  """Compiled temporary memory at T=2048 vs T=1024 (FLOPs of a rolled scan count one chunk)."""

  def temp_bytes(f, t):
    x = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
    return jax.jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  def chunked(q, k, v):
    return fn(q, k, v, chunk_size=64)[0]

  def dense(q, k, v):
    mask = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))[None]
    return reference_attention(q, k, v, mask)

  chunked_ratio = temp_bytes(chunked, 2048) / temp_bytes(chunked, 1024)
  dense_ratio = temp_bytes(dense, 2048) / temp_bytes(dense, 1024)
  assert chunked_ratio <= 2.3, chunked_ratio
  assert dense_ratio >= 3.5, dense_ratio
