"""int8 KV cache: decoding with it stays close to decoding with the float cache."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reslm.compress import apply_rules
from reslm.models import build_model
from reslm.models.attention.base import quantize_kv
from tests.compress.common import CFG


def decode(model, tokens, chunk=2):
  """Logits of decoding `tokens` `chunk` tokens per call against the cache, [b, t, vocab]."""
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, tok, cache, i: nnx.merge(graphdef, s)(tok, cache=cache, cache_index=i))
  cache = model.init_cache(tokens.shape[0], 16)
  logits = []
  for i in range(0, tokens.shape[1], chunk):
    out = step(state, tokens[:, i : i + chunk], cache, i)
    logits.append(out.logits)
    cache = out.cache
  return jnp.concatenate(logits, axis=1), cache


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_quantize_kv_error_bound():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8)) * 4
  codes, scales = quantize_kv(x)
  assert codes.dtype == jnp.int8 and scales.shape == (2, 5, 3)
  assert bool(jnp.all(jnp.abs(codes * scales[..., None] - x) <= scales[..., None] / 2 + 1e-6))


def test_int8_kv_cache_decode_close_to_float_cache():
  model = build_model(CFG)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
  ref, ref_cache = decode(model, tokens)

  result = apply_rules(model, [{"path": r".*/mixer", "method": "kv_int8"}])
  assert [e["attribute"] for e in result.manifest] == ["kv_cache_quant"] * 2  # blocks 0 and 1
  out, cache = decode(model, tokens)
  k = cache[0]["k"]
  assert k.dtype == jnp.int8 and cache[0]["k_scale"].shape == k.shape[:-1]
  assert k.nbytes * 4 == ref_cache[0]["k"].nbytes  # float32 -> int8 codes
  # Half an int8 step per key/value element: logits move by well under a percent.
  assert 0 < rel(out, ref) < 1e-2
