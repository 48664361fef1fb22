"""Dense softmax attention: the exact reference every other variant is measured against.

`implementation="xla"` is the explicit einsum/softmax form; `"jax_nn"` calls
`jax.nn.dot_product_attention`, an independent cross-check of the same math.
"""

import jax
from flax import nnx

from reslm.models.attention.base import Attention, MaskInfo, attention_kwargs, reference_attention
from reslm.models.registry import MIXERS, mixer_options

IMPLEMENTATIONS = ("xla", "jax_nn")


class DenseAttention(Attention):
  """Full softmax attention over all visible keys: O(T²) time and memory.

  Args:
    implementation: "xla" (explicit einsums) or "jax_nn" (`jax.nn.dot_product_attention`).
    **kwargs: As for `Attention`.
  """

  softmax_decode = True  # Exact softmax: an int8 KV cache is attended from its codes.

  def __init__(self, *args, implementation: str = "xla", **kwargs):
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"implementation={implementation!r} is not known for dense "
        f"attention; choose one of: {', '.join(IMPLEMENTATIONS)}"
      )
    super().__init__(*args, **kwargs)
    self.implementation = implementation

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo) -> jax.Array:
    mask = info.dense_mask()
    if self.implementation == "jax_nn":
      out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])
      return out * mask.any(-1)[:, :, None, None]  # Zero rows that see no key, as the reference.
    return reference_attention(q, k, v, mask)


@MIXERS.register("dense")
def _dense(cfg, *, causal: bool, rngs: nnx.Rngs) -> DenseAttention:
  options = mixer_options(cfg, "dense", {"implementation": "xla"})
  return DenseAttention(**attention_kwargs(cfg, causal=causal, rngs=rngs), **options)
