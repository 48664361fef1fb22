"""The shell of attention variants whose core draws random numbers (LSH, KDEformer, sampled keys).

A sampled variant declares `stochastic = True`, so the model's blocks pass it `sample_key`, its key
for this call: in training a fresh key per step and layer, in evaluation and decoding a fixed key
per layer (see `models.transformer`). The layer folds its own `seed` into that key, so two layers
configured with different seeds differ even when called with the same key. Called on its own
without a key, a layer uses `jax.random.key(seed)`: fixed, like evaluation.
"""

import jax

from reslm.models.attention.base import Attention
from reslm.models.registry import check_option, is_int
from reslm.models.sharding import constrain


class StochasticAttention(Attention):
  """An `Attention` whose `mix` takes a PRNG key.

  Args:
    seed: Folded into every key the layer samples with.
    **kwargs: As for `Attention`.
  """

  stochastic = True  # The block passes `sample_key` (models.transformer.Block).
  variant = "stochastic"  # The registered name, for error messages.

  def __init__(self, *args, seed: int = 0, **kwargs):
    check_option(self.variant, "seed", seed, is_int(seed, 0), "an integer >= 0")
    super().__init__(*args, **kwargs)
    self.seed = seed

  def call_key(self, sample_key: jax.Array | None) -> jax.Array:
    """This call's key: `sample_key` folded with the layer's seed, or key(seed) without one."""
    if sample_key is None:
      return jax.random.key(self.seed)
    return jax.random.fold_in(sample_key, self.seed)

  def __call__(
    self,
    x_btd: jax.Array,
    *,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array | None = None,
    cache: dict[str, jax.Array] | None = None,
    cache_index: jax.Array | None = None,
    sample_key: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """As `Attention.__call__`, plus `sample_key` (None: the fixed key(seed))."""
    q, k, v = self.project(x_btd, positions_bt)
    out, new_cache = self.mix(
      q,
      k,
      v,
      segment_ids_bt=segment_ids_bt,
      cache=cache,
      cache_index=cache_index,
      key=self.call_key(sample_key),
    )  # [b, t, heads, head_dim]
    out = constrain(out.astype(self.dtype), ("batch", "seq", "heads", "head_dim"))
    return self.o(out), new_cache
