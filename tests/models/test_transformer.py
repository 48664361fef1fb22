"""Decoder and encoder LMs: shapes, dtypes, causality, scan == unrolled, cached == full forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.models import ModelConfig, build_model
from reslm.models.attention.base import reference_attention

TINY = dict(vocab_size=37, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=32)


def tiny(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, **kw})


def tokens(b=2, t=12, vocab=37, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, jnp.int32)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize(
  ("dtype", "param_dtype"), [("float32", "float32"), ("bfloat16", "float32")]
)
def test_shapes_and_dtypes(kind, dtype, param_dtype):
  model = build_model(tiny(kind=kind, dtype=dtype, param_dtype=param_dtype))
  out = model(tokens())
  assert out.logits.shape == (2, 12, 37)
  assert out.logits.dtype == jnp.float32  # Logits are always float32 for a stable loss.
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.dtype(param_dtype)
  assert np.isfinite(np.asarray(out.logits)).all()


def test_every_parameter_has_logical_axes():
  model = build_model(tiny(tie_embeddings=False))
  state = nnx.state(model, nnx.Param)
  vars_ = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert vars_
  for var in vars_:
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var[...].ndim, (axes, var[...].shape)
  stacked = nnx.state(model.layers, nnx.Param)
  for var in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    assert var.get_metadata()["out_sharding"][0] == "layers"
    assert var[...].shape[0] == 4


def test_decoder_is_causal():
  model = build_model(tiny())
  x = tokens(t=16)
  base = model(x).logits
  for t in (0, 7, 14):
    changed = x.at[:, t + 1].set((x[:, t + 1] + 1) % 37)
    out = model(changed).logits
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
    assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_encoder_is_bidirectional():
  model = build_model(tiny(kind="encoder"))
  x = tokens(t=16)
  changed = x.at[:, 10].set((x[:, 10] + 1) % 37)
  assert not np.allclose(model(changed).logits[:, :10], model(x).logits[:, :10])


def _assert_scan_equals_unrolled(cfg: ModelConfig):
  scanned = build_model(cfg)
  graphdef, state = nnx.split(scanned)
  unrolled = nnx.merge(
    nnx.graphdef(build_model(dataclasses.replace(cfg, scan_layers=False))), state
  )
  x = tokens()

  def loss(model):
    out = model(x)
    return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]) + out.aux_loss

  l1, g1 = nnx.value_and_grad(loss)(scanned)
  l2, g2 = nnx.value_and_grad(loss)(unrolled)
  np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
@pytest.mark.parametrize("mixer", ["dense", "dense,dense"])
def test_scan_equals_unrolled(kind, remat, mixer):
  """The same parameters run through lax.scan and through a Python loop give the same outputs
  and the same gradients."""
  _assert_scan_equals_unrolled(tiny(kind=kind, remat=remat, mixer=mixer, scan_layers=True))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_equals_unrolled_with_moe_every_second_block(remat):
  """Groups of a dense-MLP block and an MoE block; the MoE auxiliary loss is in the loss."""
  options = {"num_experts": 4, "every": 2}
  _assert_scan_equals_unrolled(tiny(remat=remat, mlp="moe", mlp_options=options, scan_layers=True))


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_kv_cache_decoding_equals_full_forward(scan, num_kv_heads):
  model = build_model(tiny(scan_layers=scan, num_kv_heads=num_kv_heads))
  x = tokens(t=14)
  full = model(x).logits
  cache = model.init_cache(batch=2, max_len=20)
  out = model(x[:, :5], cache=cache, cache_index=0)  # Prefill 5 tokens at once.
  steps = [out.logits]
  cache = out.cache
  for t in range(5, 14):  # Then one token at a time.
    out = model(x[:, t : t + 1], cache=cache, cache_index=t)
    steps.append(out.logits)
    cache = out.cache
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


def test_jax_nn_attention_matches_reference():
  cfg = tiny()
  ref = build_model(cfg)
  graphdef, state = nnx.split(ref)
  alt_cfg = dataclasses.replace(cfg, mixer_options={"implementation": "jax_nn"})
  alt = nnx.merge(nnx.graphdef(build_model(alt_cfg)), state)
  x = tokens()
  np.testing.assert_allclose(alt(x).logits, ref(x).logits, atol=2e-5, rtol=1e-5)


def test_reference_attention_matches_explicit_loop():
  """GQA attention against a per-head numpy implementation of softmax(qkᵀ/√d)v."""
  rng = np.random.default_rng(0)
  b, t, h, g, d = 2, 5, 4, 2, 8
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  k = rng.normal(size=(b, t, g, d)).astype(np.float32)
  v = rng.normal(size=(b, t, g, d)).astype(np.float32)
  mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
  out = np.asarray(reference_attention(jnp.array(q), jnp.array(k), jnp.array(v), jnp.array(mask)))
  for bi in range(b):
    for hi in range(h):
      gi = hi // (h // g)
      s = q[bi, :, hi] @ k[bi, :, gi].T / np.sqrt(d)
      s = np.where(mask[bi], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      np.testing.assert_allclose(out[bi, :, hi], p @ v[bi, :, gi], atol=1e-5, rtol=1e-5)


def test_segment_ids_isolate_packed_sequences():
  model = build_model(tiny())
  x = tokens(b=1, t=12)
  seg = jnp.array([[1] * 6 + [2] * 6])
  pos = jnp.array([list(range(6)) * 2])
  packed = model(x, positions_bt=pos, segment_ids_bt=seg).logits
  first = model(x[:, :6]).logits
  second = model(x[:, 6:]).logits
  np.testing.assert_allclose(packed[:, :6], first, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[:, 6:], second, atol=2e-5, rtol=1e-5)


def test_param_count_is_independent_of_sequence_length():
  a = build_model(tiny(max_seq_len=32))
  b = build_model(tiny(max_seq_len=4096))
  size = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert size(a) == size(b)


@pytest.mark.parametrize(
  ("override", "match"),
  [
    (dict(d_model=128, num_heads=7), r"model.num_heads=7 does not divide model.d_model=128"),
    (dict(num_heads=4, num_kv_heads=3), r"model.num_kv_heads=3 does not divide"),
    (
      dict(mixer="nope"),
      r"model.mixer='nope' is not a known sequence mixer; choose one of: .*dense",
    ),
    (dict(mlp="nope"), r"model.mlp='nope' is not a known MLP; choose one of: gelu, .*moe.*swiglu"),
    (dict(remat="sometimes"), r"model.remat='sometimes'"),
    (dict(kind="seq2seq"), r"model.kind='seq2seq'"),
    (dict(dtype="float8"), r"model.dtype='float8'"),
    (dict(mixer="dense,dense", num_layers=3), r"not a multiple of the mixer pattern"),
  ],
)
def test_bad_settings_raise_one_line_errors(override, match):
  with pytest.raises(ValueError, match=match) as err:
    tiny(**override)
  assert "\n" not in str(err.value)
