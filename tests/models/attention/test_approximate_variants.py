"""Approximate attention variants (lsh, sampled, mega) against naive closed-form definitions, and the
per-layer / per-step randomness of the stochastic ones (KDEformer has its own file, test_kde.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import reslm.models.attention.lsh as lsh_lib
import reslm.models.attention.mega  # noqa: F401  (registers "mega")
import reslm.models.attention.sampled  # noqa: F401  (registers "sampled")
from reslm.models import ModelConfig, build_model
from reslm.models.attention.base import MaskInfo, reference_attention
from reslm.models.attention.lsh import LSHAttention, normalise, random_rotations
from reslm.models.attention.mega import MegaAttention, _softmax_attention, chunk_mask
from reslm.models.attention.sampled import sampled_estimates
from reslm.models.attention.stochastic import StochasticAttention
from reslm.training.steps import TrainState, make_eval_step, make_train_step
from tests.models.mixer_checks import first_block, randomised

TINY = dict(vocab_size=37, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=32)
VARIANTS = [
  ("lsh", {}),
  ("lsh", {"num_buckets": 4, "num_hashes": 2, "chunk_size": 2}),
  ("sampled", {"num_samples": 3}),
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
  key = jax.random.key(0)
  lsh = jax.jit(lambda q, v: layer.lsh(q, normalise(q), v, mask_info(b, t, causal), key))
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
  layer = lsh_layer(num_buckets=buckets, num_hashes=hashes, chunk_size=chunk, causal=causal)
  key = jax.random.key(7)
  lsh = jax.jit(lambda q, v: layer.lsh(q, normalise(q), v, mask_info(b, t, causal), key))
  out = lsh(jnp.array(q), jnp.array(v))
  rot = np.asarray(random_rotations(key, h, d, hashes, buckets))
  np.testing.assert_allclose(out, naive_lsh(q, v, rot, causal, chunk), atol=1e-5, rtol=1e-5)


# --- Sampled keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", [False, True])
def test_sampled_estimates_are_unbiased(causal, segments):
  b, t, h, g, d, m, n = 1, 6, 2, 1, 4, 3, 20_000
  q, k, v = normal(1, (b, t, h, d), 0.5), normal(2, (b, t, g, d)), normal(3, (b, t, g, d))
  seg = jnp.array([[1, 1, 1, 2, 2, 2]]) if segments else None
  info = mask_info(b, t, causal, seg)
  # query_block=4 splits the 6 queries into a full and a padded block.
  est = lambda key: sampled_estimates(q, k, v, info, m, key, stabilise=False, query_block=4)[:2]
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
def test_sampled_query_blocking_does_not_change_the_estimate(segments):
  b, t, h, g, d = 2, 11, 4, 2, 8
  q, k, v = normal(1, (b, t, h, d)), normal(2, (b, t, g, d)), normal(3, (b, t, g, d))
  seg = jnp.array([[1] * 6 + [2] * 5, [1] * 9 + [0] * 2]) if segments else None
  info, key = mask_info(b, t, True, seg), jax.random.key(5)
  whole = sampled_estimates(q, k, v, info, 5, key, query_block=t)
  for blocked, full in zip(
    sampled_estimates(q, k, v, info, 5, key, query_block=3), whole, strict=True
  ):
    np.testing.assert_allclose(blocked, full, atol=1e-6, rtol=1e-6)


def test_sampled_enumerating_every_key_is_exact_attention():
  cfg = tiny()
  dense = build_model(cfg)
  sampled = nnx.merge(
    nnx.graphdef(build_model(dataclasses.replace(cfg, mixer="sampled"))), nnx.state(dense)
  )
  x, forward = tokens(), logits_fn()
  np.testing.assert_allclose(
    forward(sampled, x).logits, forward(dense, x).logits, atol=2e-5, rtol=1e-5
  )


def test_sampled_sampled_output_is_close_to_exact_attention():
  b, t, h, d = 1, 16, 2, 4
  q, k, v = normal(1, (b, t, h, d), 0.3), normal(2, (b, t, h, d)), normal(3, (b, t, h, d))
  info = mask_info(b, t, True)
  num, den, _ = jax.jit(lambda key: sampled_estimates(q, k, v, info, 512, key))(jax.random.key(0))
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


def naive_mega(layer, x, residual, causal, chunk):
  """MEGA's layer output Y = u ⊙ Ĥ + (1 - u) ⊙ X from the paper's equations, in NumPy.

  x is the (normalised) layer input, residual the stream X the update gate interpolates towards.
  """
  f = lambda p: np.asarray(p[...], np.float64)  # noqa: E731
  sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
  silu = lambda a: a * sig(a)  # noqa: E731
  lin = lambda m, a: a @ f(m.kernel) + f(m.bias)  # noqa: E731
  x, residual = np.asarray(x, np.float64), np.asarray(residual, np.float64)
  alpha, delta = sig(f(layer.alpha_logit)), sig(f(layer.delta_logit))
  beta, gamma, omega = f(layer.beta), f(layer.gamma), f(layer.omega)
  b, t, _ = x.shape
  h, ema = np.zeros((b, *alpha.shape)), np.zeros_like(x)
  for i in range(t):  # h_t = α ⊙ β x_t + (1 - α ⊙ δ) ⊙ h_{t-1},  y_t = Σ_j γ_j h_t,j
    h = alpha * beta * x[:, i, :, None] + (1 - alpha * delta) * h
    ema[:, i] = np.sum(gamma * h, -1)
  xp = silu(ema + omega * x)  # X'
  z = silu(lin(layer.z, xp))
  q, k = z * f(layer.kappa)[0] + f(layer.mu)[0], z * f(layer.kappa)[1] + f(layer.mu)[1]
  v = silu(lin(layer.v, x))
  scores = np.einsum("btz,bsz->bts", q, k) / np.sqrt(q.shape[-1])
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  mask = ((i // chunk) == (j // chunk) if chunk else np.ones((t, t), bool)) & (
    (j <= i) | (not causal)
  )
  scores = np.where(mask, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  o = np.einsum("bts,bsd->btd", p / p.sum(-1, keepdims=True), v)
  r = silu(lin(layer.reset, xp))  # The reset gate is a SiLU (paper eq. 15, official code).
  u = sig(lin(layer.update, xp))
  h_hat = silu(lin(layer.hx, xp) + lin(layer.h, r * o))
  return u * h_hat + (1 - u) * residual


@pytest.mark.parametrize(("causal", "chunk"), [(True, 0), (True, 4), (False, 0)])
def test_mega_layer_equals_naive_definition(causal, chunk):
  """The layer's update plus the residual stream is MEGA's output u ⊙ Ĥ + (1 - u) ⊙ X."""
  layer = randomised(lambda: mega_layer(chunk_size=chunk, causal=causal), std=0.5)
  x, residual = normal(1, (2, 10, 16)), normal(2, (2, 10, 16))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  update, _ = jax.jit(lambda x, r: layer(x, positions_bt=pos, residual_btd=r))(x, residual)
  expected = naive_mega(layer, x, residual, causal, chunk)
  np.testing.assert_allclose(np.asarray(update) + residual, expected, atol=2e-5, rtol=1e-4)


def test_mega_block_adds_the_residual_once():
  """A block's output is Y + mlp(norm2(Y)) with Y MEGA's gated interpolation towards x itself."""
  model = build_model(tiny(mixer="mega", mixer_options={"ndim": 3}, d_model=16, num_heads=2))
  block = randomised(lambda: first_block(model), std=0.5)
  x = normal(3, (2, 9, 16))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  out = jax.jit(lambda x: block(x, positions_bt=pos)[0])(x)
  y = naive_mega(block.mixer, block.norm1(jnp.asarray(x)), x, True, 0).astype(np.float32)
  expected = y + np.asarray(block.mlp(block.norm2(jnp.asarray(y))))
  np.testing.assert_allclose(out, expected, atol=5e-5, rtol=1e-4)


# --- Randomness: fresh per layer and training step, fixed in evaluation -------------------------


def recorder(monkeypatch, owner, name, pick):
  """Wraps owner.name; each call appends pick(result) (host copy, in call order) to the list."""
  seen, original = [], getattr(owner, name)

  def wrapped(*args, **kwargs):
    out = original(*args, **kwargs)
    jax.debug.callback(lambda a: seen.append(np.asarray(a)), pick(out), ordered=True)
    return out

  monkeypatch.setattr(owner, name, wrapped)
  return seen


def record_calls(model, seen, keys):
  """Runs the model once per entry of keys (None: evaluation); returns each call's records."""
  forward = nnx.jit(lambda m, x, k: m(x, sample_key=k).logits)
  evaluate = nnx.jit(lambda m, x: m(x).logits)
  calls, x = [], tokens(t=16)
  for key in keys:
    seen.clear()
    jax.block_until_ready(evaluate(model, x) if key is None else forward(model, x, key))
    jax.effects_barrier()
    calls.append(list(seen))
  return calls


def check_fresh_per_layer_and_step(calls, layers):
  """calls: train(key 1), train(key 2), eval, eval; each a list of one record per layer."""
  assert all(len(c) == layers for c in calls)
  for records in calls:  # Every layer draws its own.
    assert not any(np.array_equal(records[0], r) for r in records[1:])
  for a, b in zip(calls[0], calls[1], strict=True):  # A new training step draws anew.
    assert not np.array_equal(a, b)
  for a, b in zip(calls[2], calls[3], strict=True):  # Evaluation draws the same every call.
    np.testing.assert_array_equal(a, b)


LSH_OPTIONS = {"num_buckets": 4, "chunk_size": 4}


def test_lsh_rotations_are_fresh_per_layer_and_step_and_fixed_in_eval(monkeypatch):
  """Under the scanned stack (the unrolled one draws the same keys: the next test)."""
  seen = recorder(monkeypatch, lsh_lib, "random_rotations", lambda rot: rot)
  cfg = tiny(mixer="lsh", mixer_options=LSH_OPTIONS, num_layers=3, scan_layers=True)
  keys = [jax.random.key(1), jax.random.key(2), None, None]
  calls = record_calls(build_model(cfg), seen, keys)
  check_fresh_per_layer_and_step(calls, layers=3)
  assert calls[0][0].shape == (4, 8, 1, 2)  # [heads, head_dim, rounds, buckets / 2]


def test_scanned_and_unrolled_layers_sample_alike(monkeypatch, mixer="lsh", options=LSH_OPTIONS):
  """A layer's key depends on its index, not on how the stack runs: same keys, same logits."""
  seen = recorder(monkeypatch, StochasticAttention, "call_key", jax.random.key_data)
  outs, records = [], []
  for scan in (True, False):
    model = build_model(tiny(mixer=mixer, mixer_options=options, num_layers=2, scan_layers=scan))
    records.append(record_calls(model, seen, [jax.random.key(3)])[0])
    outs.append(nnx.jit(lambda m, x: m(x, sample_key=jax.random.key(3)).logits)(model, tokens()))
  for a, b in zip(*records, strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)


def test_sampled_keys_are_fresh_per_layer_and_step_and_fixed_in_eval(monkeypatch):
  seen = recorder(monkeypatch, StochasticAttention, "call_key", jax.random.key_data)
  model = build_model(tiny(mixer="sampled", mixer_options={"num_samples": 4}, num_layers=2))
  calls = record_calls(model, seen, [jax.random.key(1), jax.random.key(2), None, None])
  check_fresh_per_layer_and_step(calls, layers=2)
  x, forward = tokens(t=16), nnx.jit(lambda m, x, k: m(x, sample_key=k).logits)
  assert not np.allclose(forward(model, x, jax.random.key(1)), forward(model, x, jax.random.key(2)))


def test_train_steps_sample_afresh_and_eval_steps_do_not(monkeypatch):
  """Through `training.steps`: every train step hashes anew; the eval step always the same."""
  seen = recorder(monkeypatch, lsh_lib, "random_rotations", lambda rot: rot)
  graphdef, params = nnx.split(build_model(tiny(mixer="lsh", mixer_options=LSH_OPTIONS)))
  params = nnx.to_pure_dict(params)
  tx = optax.sgd(1e-3)
  x = tokens(t=16)
  batch = {"inputs": x, "targets": x, "weights": jnp.ones(x.shape)}
  state = TrainState.create(params, tx)
  train, evaluate = jax.jit(make_train_step(graphdef, tx)), jax.jit(make_eval_step(graphdef))
  runs = []
  for fn in (lambda: train(state, batch), lambda: train(state.replace(step=state.step + 1), batch)):
    seen.clear()
    jax.block_until_ready(fn())
    jax.effects_barrier()
    runs.append(list(seen))
  for _ in range(2):
    seen.clear()
    jax.block_until_ready(evaluate(params, batch))
    jax.effects_barrier()
    runs.append(list(seen))
  assert not np.array_equal(runs[0][0], runs[1][0])
  np.testing.assert_array_equal(runs[2][0], runs[3][0])


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
    ("sampled", {"num_samples": 32}),  # Enumerates every key: the regime where decoding is exact.
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
    ("sampled", {"num_samples": 0}, r"model.mixer_options.num_samples=0 .*>= 1"),
    ("sampled", {"seed": 1.5}, r"model.mixer_options.seed=1.5 .*>= 0"),
    ("kde", {}, r"^kde \(KDEformer\) attention is bidirectional only: .*mixer 'sampled'"),
    ("mega", {"ndim": 0}, r"model.mixer_options.ndim=0 .*>= 1"),
    ("mega", {"chunk_size": -1}, r"model.mixer_options.chunk_size=-1 .*>= 0"),
    ("mega", {"zdim": -2}, r"model.mixer_options.zdim=-2 .*>= 0"),
  ],
)
def test_bad_settings_raise_one_line_errors(mixer, options, match):
  with pytest.raises(ValueError, match=match) as err:
    build_model(tiny(mixer=mixer, mixer_options=options))
  assert "\n" not in str(err.value)
