"""KDEformer (models/attention/kde.py) against a NumPy rendering of its definition: heavy LSH blocks
in Gray order, the KDE column-norm probabilities, unbiased residual estimates, exactness with one
block, and fresh hashes / samples per layer and step in an encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.models import ModelConfig, build_model
from reslm.models.attention.base import MaskInfo
from reslm.models.attention.kde import (
  column_norm_estimate,
  kdeformer_estimates,
  lsh_blocks,
  sampling_probabilities,
)
from reslm.models.attention.stochastic import StochasticAttention
from tests.models.attention.test_approximate_variants import (
  check_fresh_per_layer_and_step,
  record_calls,
  recorder,
)

B, T, H, G, D = 2, 10, 4, 2, 8
SEG = np.array([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3])  # Two packed segments; trailing padding.
ENCODER = dict(vocab_size=37, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=32)


def normal(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def info(segments: bool) -> MaskInfo:
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = jnp.asarray(SEG) if segments else None
  return MaskInfo(pos, pos, jnp.ones((B, T), bool), seg, seg, False)


def visible(segments: bool) -> np.ndarray:
  """[b, t, s] bidirectional mask: same segment (padding sees padding, as the shell's mask)."""
  if not segments:
    return np.ones((B, T, T), bool)
  return SEG[:, :, None] == SEG[:, None, :]


def qkv(seed=0):
  return normal(seed, (B, T, H, D)), normal(seed + 1, (B, T, G, D)), normal(seed + 2, (B, T, G, D))


def gray_sequence(bits: int) -> list[int]:
  """The reflected Gray code: each code differs from the next in one bit."""
  seq = [0, 1]
  for i in range(1, bits):
    seq = seq + [c + 2**i for c in reversed(seq)]
  return seq


def naive_blocks(q, k, planes, block):
  """Per (batch, head): each query's and key's block after sorting by Gray rank, then position."""
  rank = {c: i for i, c in enumerate(gray_sequence(planes.shape[-1]))}
  b, t, h, d = q.shape
  block_q, block_k = np.zeros((b, h, t), int), np.zeros((b, h, t), int)
  for bi in range(b):
    for hi in range(h):

      def blocks(x, bi=bi, hi=hi):
        codes = [
          int(sum(2**i for i in range(planes.shape[-1]) if v @ planes[hi, :, i] > 0)) for v in x
        ]
        order = sorted(range(t), key=lambda j: (rank[codes[j]], j))
        return np.array([order.index(j) // block for j in range(t)])

      block_q[bi, hi] = blocks(q[bi, :, hi])
      block_k[bi, hi] = blocks(k[bi, :, hi // (h // k.shape[2])])
  return block_q, block_k


def exact_sums(q, k, v, mask, keep=None):
  """Σ_j A_ij v_j and Σ_j A_ij over visible (and `keep`) pairs, [b, t, h, d] and [b, t, h]."""
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, 2), np.repeat(v, rep, 2)
  a = np.exp(np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])) * mask[:, None]
  if keep is not None:
    a = a * keep
  return np.einsum("bhts,bshd->bthd", a, v), a.sum(-1).transpose(0, 2, 1)


def kde_keys(seed=0):
  return tuple(jax.random.split(jax.random.key(seed), 3))


def scaled_heads(q, k):
  """The function's layouts: q / √d and kv heads repeated, [b, h, t, d]."""
  rep = q.shape[2] // k.shape[2]
  qs = jnp.asarray(q).transpose(0, 2, 1, 3) * q.shape[-1] ** -0.5
  return qs, jnp.repeat(jnp.asarray(k), rep, 2).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("segments", [False, True])
def test_heavy_blocks_equal_naive_gray_ordered_lsh_blocks(segments):
  """num_samples=0: exactly the pairs whose query and key share a sorted block, nothing else."""
  q, k, v = qkv()
  keys = kde_keys()
  planes = np.asarray(jax.random.normal(keys[0], (H, D, 3)))
  num, den, _ = jax.jit(
    lambda q, k, v: kdeformer_estimates(
      q, k, v, info(segments), keys, num_samples=0, block_size=4, num_projs=3, stabilise=False
    )
  )(q, k, v)
  block_q, block_k = naive_blocks(q / np.sqrt(D), k, planes, 4)
  heavy = block_q[:, :, :, None] == block_k[:, :, None, :]
  exact_num, exact_den = exact_sums(q, k, v, visible(segments), heavy)
  np.testing.assert_allclose(num, exact_num, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(den, exact_den, atol=1e-5, rtol=1e-5)
  assert 0 < heavy.mean() < 1  # Some pairs are left to the residual.


@pytest.mark.parametrize("segments", [True])
def test_estimates_are_unbiased(segments):
  """Heavy blocks plus column samples: the mean over sample draws is the exact Σ_j A_ij [v_j, 1]."""
  q, k, v = qkv(3)
  hash_key, kde_key, _ = kde_keys(1)
  n = 20_000

  def estimate(sample_key):
    keys = (hash_key, kde_key, sample_key)
    out = kdeformer_estimates(
      q, k, v, info(segments), keys, num_samples=3, block_size=4, num_projs=2, stabilise=False
    )
    return out[:2]

  num, den = jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(2), n))
  exact_num, exact_den = exact_sums(q, k, v, visible(segments))
  for est, exact in ((np.asarray(num), exact_num), (np.asarray(den), exact_den)):
    stderr = est.std(0) / np.sqrt(n)
    # 5 standard errors, plus float32 round-off of the mean (all-heavy rows have no variance).
    assert np.all(np.abs(est.mean(0) - exact) <= 5 * stderr + 1e-3 * (1 + np.abs(exact)))
  assert np.asarray(den).std(0).max() > 0  # The residual is sampled, not enumerated.


def test_column_norms_and_probabilities_follow_the_definition():
  """c_j = Σ_i A_res,ij² / D_i² (exact with every row; unbiased from random rows) and
  p = ½ c / Σc + ½ (|v|² + 1) / Σ(|v|² + 1); p depends on the queries."""
  q, k, v = qkv(6)
  mask = visible(True)
  qs, kh = scaled_heads(q, k)
  planes = jax.random.normal(jax.random.key(4), (H, D, 2))
  _, (block_q, block_k) = lsh_blocks(qs, kh, jnp.ones((B, T), bool), planes, 4)
  everything = jnp.broadcast_to(jnp.arange(T), (B, H, T))
  col = column_norm_estimate(qs, kh, info(True), everything, block_q, block_k)

  a = np.exp(np.einsum("bhtd,bhsd->bhts", qs, kh)) * mask[:, None]
  residual = np.asarray(block_q)[..., :, None] != np.asarray(block_k)[..., None, :]
  exact = np.sum((a / a.sum(-1, keepdims=True)) ** 2 * residual, axis=2)  # [b, h, s]
  np.testing.assert_allclose(col, exact, atol=1e-6, rtol=1e-5)

  def sampled_rows(key):
    rows = jax.random.randint(key, (B, H, 3), 0, T)
    return column_norm_estimate(qs, kh, info(True), rows, block_q, block_k)

  draws = np.asarray(jax.jit(jax.vmap(sampled_rows))(jax.random.split(jax.random.key(5), 20_000)))
  stderr = draws.std(0) / np.sqrt(len(draws))
  assert np.all(np.abs(draws.mean(0) - exact) <= 5 * stderr + 1e-6)

  vh = np.repeat(v, H // G, 2).transpose(0, 2, 1, 3)
  w = (vh**2).sum(-1) + 1
  expected = 0.5 * exact / exact.sum(-1, keepdims=True) + 0.5 * w / w.sum(-1, keepdims=True)
  p = sampling_probabilities(col, jnp.asarray(vh), jnp.ones((B, T), bool))
  np.testing.assert_allclose(p, expected, atol=1e-6, rtol=1e-5)

  other_q, _ = scaled_heads(normal(9, q.shape), k)
  moved = column_norm_estimate(other_q, kh, info(True), everything, block_q, block_k)
  assert not np.allclose(sampling_probabilities(moved, jnp.asarray(vh), jnp.ones((B, T), bool)), p)


def test_one_block_is_exact_attention_and_many_samples_come_close():
  q, k, v = qkv(7)
  exact_num, exact_den = exact_sums(q, k, v, visible(True))
  exact = exact_num / exact_den[..., None]
  run = jax.jit(
    lambda block, m: kdeformer_estimates(
      q, k, v, info(True), kde_keys(), num_samples=m, block_size=block, num_projs=3
    ),
    static_argnums=(0, 1),
  )
  num, den, _ = run(T, 2)
  np.testing.assert_allclose(num / den[..., None], exact, atol=1e-5, rtol=1e-5)
  num, den, _ = run(2, 512)
  assert np.abs(num / den[..., None] - exact).mean() < 0.1


def test_encoder_with_one_block_equals_dense():
  dense = build_model(ModelConfig(**ENCODER, num_layers=1, kind="encoder"))
  kde_cfg = ModelConfig(**ENCODER, num_layers=1, kind="encoder", mixer="kde")
  kde = nnx.merge(nnx.graphdef(build_model(kde_cfg)), nnx.state(dense))  # block_size 64 >= 16
  x = np.random.default_rng(0).integers(1, 37, (2, 16), dtype=np.int32)
  forward = nnx.jit(lambda m, x: m(x).logits)
  np.testing.assert_allclose(forward(kde, x), forward(dense, x), atol=2e-5, rtol=1e-5)


def test_encoder_hashes_and_samples_afresh_per_layer_and_step(monkeypatch):
  seen = recorder(monkeypatch, StochasticAttention, "call_key", jax.random.key_data)
  options = {"num_samples": 4, "block_size": 4, "num_projs": 2}
  model = build_model(
    ModelConfig(**ENCODER, num_layers=2, kind="encoder", mixer="kde", mixer_options=options)
  )
  calls = record_calls(model, seen, [jax.random.key(1), jax.random.key(2), None, None])
  check_fresh_per_layer_and_step(calls, layers=2)
  x = np.random.default_rng(1).integers(1, 37, (2, 16), dtype=np.int32)

  def loss(m, key):
    return jnp.mean(jax.nn.log_softmax(m(x, sample_key=key).logits)[..., 0])

  grad_fn = nnx.jit(nnx.value_and_grad(loss))
  (value, grads), (other, _) = grad_fn(model, jax.random.key(1)), grad_fn(model, jax.random.key(2))
  assert np.isfinite(value) and value != other  # Another step's samples give another loss.
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
