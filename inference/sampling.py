"""Autoregressive generation with a KV cache, compiled as one program.

The prompt is prefilled in one call that fills the cache; new tokens are then produced by a
`jax.lax.scan` whose body runs the model on one token at the next cache slot and samples the
next token (greedy, temperature, top-k and/or top-p). Nothing returns to Python between tokens.

Decoding that differs from the model's full forward is never silent: `generate` logs one warning
line per layer whose cached decoding is inexact (`models.decoding.decode_notes`: approximate
mixers' fallbacks, MoE capacity drops, an int8 KV cache) and refuses models that cannot decode.
"""

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.decoding import check_decodable, decode_notes

_MASKED = -jnp.inf
_LOG = logging.getLogger(__name__)


def sample_logits(
  logits_bv: jax.Array,
  rng: jax.Array,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> jax.Array:
  """Draws one token per row.

  Args:
    logits_bv: float [batch, vocab].
    rng: PRNG key.
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: Keep only the k most likely tokens (0 = all).
    top_p: Keep the smallest set of most likely tokens whose probability reaches top_p (nucleus).

  Returns:
    int32 [batch].
  """
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(
      f"sampling needs temperature >= 0 (got {temperature}), 0 < top_p <= 1 (got {top_p}) and "
      f"top_k >= 0 (got {top_k})"
    )
  logits = logits_bv.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, _MASKED, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Mass strictly above each token.
    drop_sorted = before >= top_p  # The top token always has before == 0, so it is kept.
    drop = (
      jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    )
    logits = jnp.where(drop, _MASKED, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
  model: nnx.Module,
  prompt_bt: jax.Array,
  *,
  max_new_tokens: int,
  rng: jax.Array,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | None = None,
) -> jax.Array:
  """Continues each prompt by `max_new_tokens` tokens.

  Args:
    model: A decoder LM with `init_cache` and the cache call convention (`models.DecoderLM`).
    prompt_bt: int32 [batch, prompt_len]; all rows have the same length.
    max_new_tokens: Tokens to generate.
    rng: PRNG key (unused when greedy).
    temperature, top_k, top_p: Sampling rule, see `sample_logits`.
    eos_id: If given, a row that emits it keeps emitting it.

  Returns:
    int32 [batch, prompt_len + max_new_tokens]: prompt followed by the new tokens.

  Raises:
    ValueError: If the model cannot decode (not a decoder, or a mixer without a cache), the total
      length exceeds the model's maximum or arguments are out of range.
  """
  check_decodable(model)
  prompt_bt = jnp.asarray(prompt_bt, jnp.int32)
  b, p = prompt_bt.shape
  total = p + max_new_tokens
  max_len = model.cfg.max_seq_len
  if p < 1 or max_new_tokens < 1:
    raise ValueError(
      f"need a non-empty prompt and max_new_tokens >= 1; got {p} and {max_new_tokens}"
    )
  if total > max_len:
    raise ValueError(
      f"prompt ({p}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds the model's "
      f"max_seq_len={max_len}"
    )
  sample_logits(jnp.zeros((1, 2)), rng, temperature=temperature, top_k=top_k, top_p=top_p)
  for note in decode_notes(model):
    _LOG.warning("generate: %s", note)
  graphdef, state = nnx.split(model)
  return _generate(
    graphdef,
    state,
    prompt_bt,
    rng,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_id=eos_id,
  )


@functools.partial(
  jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")
)
def _generate(
  graphdef, state, prompt_bt, rng, *, max_new_tokens, temperature, top_k, top_p, eos_id
):
  model = nnx.merge(graphdef, state)
  b, p = prompt_bt.shape
  cache = model.init_cache(b, p + max_new_tokens)
  out = model(prompt_bt, cache=cache, cache_index=0)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  rng, key = jax.random.split(rng)
  first = sample(out.logits[:, -1], key)
  done = jnp.zeros((b,), bool)

  def body(carry, i):
    token, cache, rng, done = carry
    if eos_id is not None:
      done = done | (token == eos_id)
    step_out = model(token[:, None], cache=cache, cache_index=p + i)
    rng, key = jax.random.split(rng)
    nxt = sample(step_out.logits[:, -1], key)
    if eos_id is not None:
      nxt = jnp.where(done, eos_id, nxt)
    return (nxt, step_out.cache, rng, done), token

  (last, _, _, _), tokens = jax.lax.scan(
    body, (first, out.cache, rng, done), jnp.arange(max_new_tokens - 1)
  )
  new = jnp.concatenate([tokens.T, last[:, None]], axis=1) if max_new_tokens > 1 else last[:, None]
  return jnp.concatenate([prompt_bt, new], axis=1)
