"""int8 KV cache attended from its codes: `int8_attention` equals softmax attention over the
dequantised cache, decoding takes it for the exact-softmax variants, and a decoding step holds no
float copy of the cache (the old path held two)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.models import ModelConfig, build_model
from reslm.models.attention.base import int8_attention, quantize_kv, reference_attention

B, H, G, D = 2, 4, 2, 8


def case(t, s, dtype=jnp.float32, seed=0):
  """Queries [B, t, H, D], int8 keys/values (codes, scales) for s slots and a random mask."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, t, H, D)), dtype)
  k_codes, k_scale = quantize_kv(jnp.asarray(3 * rng.normal(size=(B, s, G, D)), jnp.float32))
  v_codes, v_scale = quantize_kv(jnp.asarray(rng.normal(size=(B, s, G, D)), jnp.float32))
  mask = jnp.asarray(rng.random((B, t, s)) < 0.6)
  return q, k_codes, k_scale, v_codes, v_scale, mask


@pytest.mark.parametrize(
  ("t", "key_block", "dtype"),
  [
    (1, 512, jnp.float32),  # One decoding step: the fused schedule.
    (5, 512, jnp.float32),  # A few tokens per call (still fused).
    (20, 8, jnp.float32),  # A prefill: 5 key blocks of 8, the last one padded.
    (20, 512, jnp.float32),  # A prefill in one block.
    (1, 512, jnp.bfloat16),
    (20, 8, jnp.bfloat16),
  ],
)
def test_int8_attention_equals_attention_over_the_dequantised_cache(t, key_block, dtype):
  """Keys in two segments (37 cached + the call's t), attended as one dequantised cache."""
  q, *old = case(t, s=37, dtype=dtype)
  _, *own = case(t, s=t, seed=1)
  codes_scales = [jnp.concatenate([a, b], 1) for a, b in zip(old[:4], own[:4], strict=True)]
  k_codes, k_scale, v_codes, v_scale = codes_scales
  mask = jnp.concatenate([old[4], own[4]], -1).at[0, 0].set(False)  # Row (0, 0) sees nothing.
  old[4], own[4] = mask[..., :37], mask[..., 37:]
  k, v = k_codes * k_scale[..., None], v_codes * v_scale[..., None]  # The whole-cache reference.
  ref = reference_attention(q.astype(jnp.float32), k, v, mask)
  out = jax.jit(int8_attention, static_argnames="key_block")(q, [old, own], key_block=key_block)
  assert out.dtype == dtype and out.shape == q.shape
  tol = 2e-6 if dtype == jnp.float32 else 1e-2  # float32 rounding vs bfloat16's 8-bit mantissa
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)
  assert np.all(np.asarray(out[0, 0]) == 0)
  # One segment alone is plain attention over it.
  alone = int8_attention(q, [tuple(old)], key_block=key_block)
  ref = reference_attention(
    q.astype(jnp.float32), *(c * s[..., None] for c, s in (old[:2], old[2:4])), old[4]
  )
  np.testing.assert_allclose(np.asarray(alone, np.float32), ref, atol=tol, rtol=tol)


def int8_model(mixer, *, fused=True, max_len=256):
  cfg = dict(vocab_size=37, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2)
  model = build_model(ModelConfig(**cfg, mixer=mixer, max_seq_len=max_len))
  for block in model.layers.groups.blocks:
    block.mixer.kv_cache_quant = "int8"
    if not fused:  # The old path: dequantise the cache whole, then `attend`.
      block.mixer.softmax_decode = False
  return model


def decode_logits(model, tokens, max_len):
  step = nnx.jit(lambda m, x, c, i: (lambda o: (o.logits, o.cache))(m(x, cache=c, cache_index=i)))
  logits, cache = step(model, tokens[:, :3], model.init_cache(tokens.shape[0], max_len), 0)
  out = [logits]
  for i in range(3, tokens.shape[1]):
    logits, cache = step(model, tokens[:, i : i + 1], cache, jnp.int32(i))
    out.append(logits)
  return np.asarray(jnp.concatenate(out, 1))


@pytest.mark.parametrize("mixer", ["dense", "flash", "memory_efficient", "sliding_window"])
def test_decoding_from_codes_equals_decoding_over_the_dequantised_cache(mixer):
  fused, whole = int8_model(mixer, max_len=24), int8_model(mixer, fused=False, max_len=24)
  nnx.update(whole, nnx.state(fused))
  tokens = np.random.default_rng(1).integers(0, 37, (2, 10)).astype(np.int32)
  np.testing.assert_allclose(
    decode_logits(fused, tokens, 24), decode_logits(whole, tokens, 24), atol=2e-5, rtol=1e-5
  )


def float_buffers(model, max_len):
  """Element counts of the float arrays a compiled one-token decoding step materialises.

  From the optimised HLO: every instruction outside fusion bodies (whose intermediates live in
  registers) that produces a float array.
  """
  graphdef, state = nnx.split(model)

  def step(s, c):
    return nnx.merge(graphdef, s)(jnp.zeros((1, 1), jnp.int32), cache=c, cache_index=7)

  hlo = jax.jit(step, donate_argnums=1).lower(state, model.init_cache(1, max_len)).compile()
  hlo = hlo.as_text()
  fused = set(re.findall(r"fusion\(.*calls=%([\w.\-]+)", hlo))
  sizes = []
  for comp in hlo.split("\n\n"):
    name = re.match(r"(?:ENTRY )?%([\w.\-]+)", comp.strip())
    if name is None or name[1] in fused:
      continue
    for dims in re.findall(r"= (?:f32|bf16|f16)\[([\d,]*)\]", comp):
      sizes.append(math.prod(int(x) for x in dims.split(",") if x))
  return sizes


def test_a_decoding_step_makes_no_float_copy_of_the_int8_cache():
  """Dequantising whole materialises float keys and values for all max_len slots; attending from
  the codes materialises nothing larger than the scores, one float per slot and head (a head_dim
  / group-size fraction of the cache: 1/4 here, 1/64 at head_dim 64 without GQA)."""
  max_len = 2048
  cache_elements = max_len * 2 * 8  # [max_len, kv_heads, head_dim]
  whole = float_buffers(int8_model("dense", fused=False, max_len=max_len), max_len)
  fused = float_buffers(int8_model("dense", max_len=max_len), max_len)
  assert sum(n >= cache_elements for n in whole) >= 2
  assert max(fused) <= max_len * 4 < cache_elements  # [slots, heads] scores at most
