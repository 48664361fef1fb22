"""Checks shared by the sequence-mixer tests: causality, cached decoding vs the full forward,
constant-size recurrent state, one-line option errors, and parameter randomisation.

The checks run whole models (`models.build_model`) through jitted `logits` / `decode` helpers, so
each test file compiles its own tiny model once and reuses it across checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

VOCAB = 37  # Token ids are drawn below this; every mixer test model uses vocab_size=37.


def tokens(b=2, t=14, seed=0):
  """Random token ids in [1, VOCAB), int32 [b, t] (NumPy)."""
  return np.random.default_rng(seed).integers(1, VOCAB, (b, t), dtype=np.int32)


def normal(shape, seed=0):
  """Standard normal float32 NumPy array."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@nnx.jit
def logits(model, x, segment_ids=None):
  return model(x, segment_ids_bt=segment_ids).logits


@nnx.jit
def decode(model, x, cache, index, segment_ids=None):
  out = model(x, segment_ids_bt=segment_ids, cache=cache, cache_index=index)
  return out.logits, out.cache


def randomize(module, scale, seed=0):
  """Adds scale * N(0, 1) noise to every parameter (zero-initialised pieces become active).

  Host-side NumPy: no per-shape compiles.
  """
  rng = np.random.default_rng(seed)
  noisy = lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype)
  nnx.update(module, jax.tree.map(noisy, nnx.state(module, nnx.Param)))
  return module


def randomised(make, seed: int = 0, std: float = 0.3):
  """The module `make()` builds, every parameter drawn from N(0, std²) by NumPy.

  The identities tested hold for any parameters; skipping the real initialisers (each parameter
  shape compiles its own jax.random program) keeps the tests fast.
  """
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, std, a.shape), a.dtype), state)
  return nnx.merge(graphdef, state)


def first_block(model):
  """Layer 0 of a DecoderLM as a standalone block (a copy)."""
  graphdef, state = nnx.split(model.layers.groups)
  return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[0]), state)).blocks[0]


def check_causal(model, x, full, positions=(0, 6, 12)):
  """Changing token j + 1 changes no logit up to j (and does change later ones)."""
  x = np.asarray(x)
  for t in positions:
    changed = x.copy()
    changed[:, t + 1] = (x[:, t + 1] + 1) % VOCAB
    changed = np.asarray(logits(model, changed))
    np.testing.assert_allclose(changed[:, : t + 1], full[:, : t + 1], atol=1e-6, rtol=0)
    assert not np.allclose(changed[:, t + 1 :], full[:, t + 1 :])


def check_decoding(model, x, full, prefill, max_len=20):
  """Prefill `prefill` tokens, then one token at a time: the logits equal the full forward."""
  cache = model.init_cache(batch=x.shape[0], max_len=max_len)
  out, cache = decode(model, x[:, :prefill], cache, jnp.int32(0))
  steps = [np.asarray(out)]
  for t in range(prefill, x.shape[1]):
    out, cache = decode(model, x[:, t : t + 1], cache, jnp.int32(t))
    steps.append(np.asarray(out))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


def check_causal_and_decoding(model, prefills, x=None):
  """`check_causal`, then `check_decoding` from each prompt length in `prefills`."""
  x = tokens() if x is None else x
  full = np.asarray(logits(model, x))
  check_causal(model, x, full)
  for prefill in prefills:
    check_decoding(model, x, full, prefill)


def check_state_size_is_constant(model):
  """The decoding state does not grow with max_len (a recurrent, not a KV, cache)."""
  shapes = lambda n: jax.tree.map(lambda a: a.shape, model.init_cache(batch=2, max_len=n))
  assert shapes(16) == shapes(4096)


def check_one_line_error(fn, match):
  """fn() raises a ValueError matching `match` whose message is a single line."""
  with pytest.raises(ValueError, match=match) as err:
    fn()
  assert "\n" not in str(err.value)


def check_left_padding(model):
  """Left padding (segment id 0) is invisible to the real tokens after it.

  Row 0 is x after 5 padding tokens; row 1 is x followed by 5 other tokens.

  Returns:
    (tokens [2, 14], segment ids [2, 14], logits with the segment ids), for further checks.
  """
  x, extra = tokens(b=1, t=9), tokens(b=1, t=5, seed=1)
  both = np.concatenate([np.concatenate([0 * extra, x], 1), np.concatenate([x, extra], 1)])
  seg = np.array([[0] * 5 + [1] * 9, [1] * 14], np.int32)
  out = np.asarray(logits(model, both, seg))
  np.testing.assert_allclose(out[0, 5:], out[1, :9], atol=2e-5, rtol=1e-5)
  assert not np.allclose(logits(model, both)[0, 5:], out[1, :9])  # Unmasked padding is seen.
  return both, seg, out


def check_too_long_raises(model, max_seq_len):
  """Inputs and caches longer than max_seq_len raise one-line errors naming the lengths."""
  n = max_seq_len + 1
  check_one_line_error(
    lambda: model(tokens(t=n)), rf"sequence length {n} exceeds model.max_seq_len={max_seq_len}"
  )
  check_one_line_error(
    lambda: model.init_cache(batch=1, max_len=n),
    rf"cache length {n} exceeds model.max_seq_len={max_seq_len}",
  )
