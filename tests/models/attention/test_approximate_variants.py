"""Approximate attention variants (lsh, kde, mega) against naive closed-form definitions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reslm.models.attention.kde  # noqa: F401  (registers "kde")
import reslm.models.attention.lsh  # noqa: F401  (registers "lsh")
import reslm.models.attention.mega  # noqa: F401  (registers "mega")
from reslm.models import ModelConfig, build_model
from reslm.models.attention.base import MaskInfo, reference_attention
from reslm.models.attention.kde import kde_estimates
from reslm.models.attention.lsh import LSHAttention, normalise, random_rotations
from reslm.models.attention.mega import MegaAttention, _softmax_attention, chunk_mask

TINY = dict(vocab_size=37, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=32)
VARIANTS = [
  ("lsh", {}),
  ("lsh", {"num_buckets": 4, "num_hashes": 2, "chunk_size": 2}),
  ("kde", {"num_samples": 3}),
  ("mega", {}),
  ("mega", {"chunk_size": 4, "ndim": 3}),
]


def tiny(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, **kw})


def logits_fn():
  """A jitted forward: one compile per shape is much cheaper than eager op-by-op dispatch."""
  return nnx.jit(lambda model, x, **kw: model(x, **kw))


def tokens(b=2, t=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 37, jnp.int32)


def normal(seed, shape, scale=1.0):
  return scale * np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def mask_info(b, t, causal, seg=None):
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return MaskInfo(pos, pos, jnp.ones((b, t), bool), seg, seg, causal)


# --- LSH ------------------------------------------------------------------------------------------


def naive_lsh(q, v, rot, causal, chunk):
  """Per head and round: bucket each token, group each bucket's tokens (by position) into chunks
  of `chunk`, attend to own-bucket keys in this and the previous group; combine rounds by lse."""
  b, t, h, d = q.shape
  k = q / np.linalg.norm(q, axis=-1, keepdims=True)
  nb = 2 * rot.shape[-1]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      outs, lses = [], []
      for r in range(rot.shape[2]):
        proj = k[bi, :, hi] @ rot[hi, :, r]
        bucket = np.argmax(np.concatenate([proj, -proj], -1), -1) if nb > 1 else np.zeros(t, int)
        o_r, lse_r = np.zeros((t, d)), np.zeros(t)
        for i in range(t):
          members = [j for j in range(t) if bucket[j] == bucket[i]]
          rank = members.index(i)
          lo = (rank // chunk - 1) * chunk
          keys = [j for n, j in enumerate(members) if lo <= n < lo + 2 * chunk]
          keys = [j for j in keys if not causal or j <= i]
          s = np.array([-1e5 if j == i else q[bi, i, hi] @ k[bi, j, hi] / np.sqrt(d) for j in keys])
          lse_r[i] = np.log(np.sum(np.exp(s - s.max()))) + s.max()
          o_r[i] = np.exp(s - lse_r[i]) @ v[bi, keys, hi]
        outs.append(o_r)
        lses.append(lse_r)
      w = np.exp(np.array(lses) - np.logaddexp.reduce(np.array(lses), axis=0))  # [r, t]
      out[bi, :, hi] = np.sum(w[..., None] * np.array(outs), 0)
  return out


def lsh_layer(**kw):
  return LSHAttention(32, 4, 2, 8, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("causal", [True, False])
def test_lsh_single_bucket_is_exact_shared_qk_attention(causal):
  b, t, h, d = 2, 9, 4, 8
  q, v = normal(1, (b, t, h, d)), normal(2, (b, t, h, d))
  layer = lsh_layer(num_buckets=1, num_hashes=1, chunk_size=t, causal=causal)
  lsh = jax.jit(lambda q, v: layer.lsh(q, normalise(q), v, mask_info(b, t, causal)))
  out = lsh(jnp.array(q), jnp.array(v))
  k = q / np.linalg.norm(q, axis=-1, keepdims=True)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  mask = np.tril(np.ones((t, t), bool)) if causal else np.ones((t, t), bool)
  eye = np.eye(t, dtype=bool)
  allowed = mask & (~eye | ((mask & ~eye).sum(-1, keepdims=True) == 0))  # Reformer's self rule.
  scores = np.where(allowed, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  ref = np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  ("causal", "buckets", "hashes", "chunk"),
  [(True, 4, 2, 2), (False, 4, 2, 2), (True, 2, 3, 1), (False, 4, 1, 16)],
)
def test_lsh_equals_naive_per_bucket_attention(causal, buckets, hashes, chunk):
  b, t, h, d = 2, 10, 4, 8
  q, v = normal(3, (b, t, h, d)), normal(4, (b, t, h, d))
  layer = lsh_layer(num_buckets=buckets, num_hashes=hashes, chunk_size=chunk, seed=7, causal=causal)
  lsh = jax.jit(lambda q, v: layer.lsh(q, normalise(q), v, mask_info(b, t, causal)))
  out = lsh(jnp.array(q), jnp.array(v))
  rot = np.asarray(random_rotations(7, t, h, d, hashes, buckets))
  np.testing.assert_allclose(out, naive_lsh(q, v, rot, causal, chunk), atol=1e-5, rtol=1e-5)


# --- KDE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", [False, True])
def test_kde_estimates_are_unbiased(causal, segments):
  b, t, h, g, d, m, n = 1, 6, 2, 1, 4, 3, 20_000
  q, k, v = normal(1, (b, t, h, d), 0.5), normal(2, (b, t, g, d)), normal(3, (b, t, g, d))
  seg = jnp.array([[1, 1, 1, 2, 2, 2]]) if segments else None
  info = mask_info(b, t, causal, seg)
  # query_block=4 splits the 6 queries into a full and a padded block.
  est = lambda key: kde_estimates(q, k, v, info, m, key, stabilise=False, query_block=4)[:2]
  run = jax.jit(jax.vmap(est))
  num, den = run(jax.random.split(jax.random.key(0), n))
  mask = np.asarray(info.dense_mask())[:, None]  # [b, 1, t, s]
  a = np.exp(np.einsum("bthd,bsd->bhts", q, k[:, :, 0]) / np.sqrt(d)) * mask
  exact_num = np.einsum("bhts,bsd->bthd", a, v[:, :, 0])
  exact_den = a.sum(-1).transpose(0, 2, 1)
  for est, exact in ((num, exact_num), (den, exact_den)):
    stderr = np.asarray(est).std(0) / np.sqrt(n)
    # 5 standard errors, plus float32 round-off of the mean (rows with one key have no variance).
    assert np.all(
      np.abs(np.asarray(est).mean(0) - exact) <= 5 * stderr + 1e-3 * (1 + np.abs(exact))
    )


@pytest.mark.parametrize("segments", [False, True])
def test_kde_query_blocking_does_not_change_the_estimate(segments):
  b, t, h, g, d = 2, 11, 4, 2, 8
  q, k, v = normal(1, (b, t, h, d)), normal(2, (b, t, g, d)), normal(3, (b, t, g, d))
  seg = jnp.array([[1] * 6 + [2] * 5, [1] * 9 + [0] * 2]) if segments else None
  info, key = mask_info(b, t, True, seg), jax.random.key(5)
  whole = kde_estimates(q, k, v, info, 5, key, query_block=t)
  for blocked, full in zip(kde_estimates(q, k, v, info, 5, key, query_block=3), whole, strict=True):
    np.testing.assert_allclose(blocked, full, atol=1e-6, rtol=1e-6)


def test_kde_enumerating_every_key_is_exact_attention():
  cfg = tiny()
  dense = build_model(cfg)
  kde = nnx.merge(
    nnx.graphdef(build_model(dataclasses.replace(cfg, mixer="kde"))), nnx.state(dense)
  )
  x, forward = tokens(), logits_fn()
  np.testing.assert_allclose(forward(kde, x).logits, forward(dense, x).logits, atol=2e-5, rtol=1e-5)


def test_kde_sampled_output_is_close_to_exact_attention():
  b, t, h, d = 1, 16, 2, 4
  q, k, v = normal(1, (b, t, h, d), 0.3), normal(2, (b, t, h, d)), normal(3, (b, t, h, d))
  info = mask_info(b, t, True)
  num, den, _ = jax.jit(lambda key: kde_estimates(q, k, v, info, 512, key))(jax.random.key(0))
  exact = reference_attention(q, k, v, info.dense_mask())
  np.testing.assert_allclose(num / den[..., None], exact, atol=0.15)


# --- MEGA -----------------------------------------------------------------------------------------


def mega_layer(**kw):
  return MegaAttention(16, ndim=3, zdim=8, rngs=nnx.Rngs(0), **kw)


def test_mega_ema_equals_recurrence_loop():
  layer = mega_layer()
  x = normal(1, (2, 11, 16))
  alpha, delta, beta, gamma = (np.asarray(p) for p in layer.ema_params())
  h = np.zeros((2, 16, 3))
  ref = []
  for t in range(11):
    h = alpha * beta * x[:, t, :, None] + (1 - alpha * delta) * h  # [b, D, n]
    ref.append(np.sum(gamma * h, -1))
  ref = np.stack(ref, 1)
  np.testing.assert_allclose(layer.ema(jnp.array(x)), ref, atol=1e-5, rtol=1e-4)
  steps, state = layer.ema_steps(jnp.array(x), jnp.zeros((2, 16, 3)))
  np.testing.assert_allclose(steps, ref, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(state, h, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_mega_chunk_of_full_length_equals_full_attention(causal):
  full = mega_layer(chunk_size=0, causal=causal)
  chunked = nnx.merge(nnx.graphdef(mega_layer(chunk_size=10, causal=causal)), nnx.state(full))
  x = jnp.array(normal(2, (2, 10, 16)))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  np.testing.assert_allclose(
    chunked(x, positions_bt=pos)[0], full(x, positions_bt=pos)[0], atol=1e-6
  )


@pytest.mark.parametrize("causal", [True, False])
def test_mega_chunked_attention_equals_masked_dense(causal):
  layer = mega_layer(chunk_size=3, causal=causal)
  q, k, v = normal(1, (2, 10, 8)), normal(2, (2, 10, 8)), normal(3, (2, 10, 16))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  ref = _softmax_attention(q, k, v, chunk_mask(pos, pos, 3, causal))
  np.testing.assert_allclose(layer.attend(q, k, v), ref, atol=1e-6)


# --- Every variant through the model --------------------------------------------------------------


@pytest.mark.parametrize(("mixer", "options"), VARIANTS)
def test_decoder_is_causal(mixer, options):
  model, forward = build_model(tiny(mixer=mixer, mixer_options=options)), logits_fn()
  x = tokens(t=16)
  base = forward(model, x).logits
  for t in (0, 7, 14):
    changed = x.at[:, t + 1].set((x[:, t + 1] + 1) % 37)
    out = forward(model, changed).logits
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
    assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize(
  ("kind", "mixer", "options"),
  [("decoder", *v) for v in VARIANTS] + [("encoder", *VARIANTS[1])],
)
def test_gradients_are_finite(kind, mixer, options):
  model = build_model(tiny(kind=kind, mixer=mixer, mixer_options=options))
  x = tokens()

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(x).logits)[..., 0])

  value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
  assert np.isfinite(value)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


@pytest.mark.parametrize(
  ("mixer", "options"),
  [
    ("mega", {}),
    ("mega", {"chunk_size": 4}),
    ("kde", {"num_samples": 32}),  # Enumerates every key: the regime where decoding is exact.
    ("lsh", {"num_buckets": 1, "chunk_size": 32}),  # One bucket and chunk: exact shared-QK.
  ],
)
def test_decoding_equals_full_forward(mixer, options):
  model, forward = build_model(tiny(mixer=mixer, mixer_options=options)), logits_fn()
  x = tokens(t=14)
  full = forward(model, x).logits
  out = forward(model, x[:, :5], cache=model.init_cache(batch=2, max_len=20), cache_index=0)
  steps, cache = [out.logits], out.cache
  for t in range(5, 14):
    out = forward(model, x[:, t : t + 1], cache=cache, cache_index=jnp.int32(t))
    steps.append(out.logits)
    cache = out.cache
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
  ("mixer", "options", "match"),
  [
    ("lsh", {"num_buckets": 3}, r"model.mixer_options.num_buckets=3 .*even"),
    ("lsh", {"num_hashes": 0}, r"model.mixer_options.num_hashes=0 .*>= 1"),
    ("lsh", {"chunk_size": 0}, r"model.mixer_options.chunk_size=0 .*>= 1"),
    ("lsh", {"seed": "x"}, r"model.mixer_options.seed='x'"),
    ("lsh", {"num_buckets": "x"}, r"model.mixer_options.num_buckets='x' .*integer"),
    ("lsh", {"buckets": 2}, r"model.mixer_options.buckets is not a setting"),
    ("kde", {"num_samples": 0}, r"model.mixer_options.num_samples=0 .*>= 1"),
    ("kde", {"seed": 1.5}, r"model.mixer_options.seed=1.5"),
    ("mega", {"ndim": 0}, r"model.mixer_options.ndim=0 .*>= 1"),
    ("mega", {"chunk_size": -1}, r"model.mixer_options.chunk_size=-1 .*>= 0"),
    ("mega", {"zdim": -2}, r"model.mixer_options.zdim=-2 .*>= 0"),
  ],
)
def test_bad_settings_raise_one_line_errors(mixer, options, match):
  with pytest.raises(ValueError, match=match) as err:
    build_model(tiny(mixer=mixer, mixer_options=options))
  assert "\n" not in str(err.value)
