"""The public function's contract: one-line errors before anything is lowered."""

import jax.numpy as jnp
import pytest

from reslm.kernels_pallas.paged_attention import BlockSizes, paged_attention

B, H, HK, D, P, PS, PPS = 2, 4, 2, 32, 6, 16, 3
ARGS = dict(
  q=jnp.ones((B, H, D)),
  k_pages=jnp.ones((HK, P, PS, D)),
  v_pages=jnp.ones((HK, P, PS, D)),
  lengths=jnp.array([5, 20], jnp.int32),
  block_tables=jnp.zeros((B, PPS), jnp.int32),
)
INT8 = dict(
  q=jnp.ones((B, H, D), jnp.bfloat16),
  k_pages=jnp.ones((HK, P, PS, D), jnp.int8),
  v_pages=jnp.ones((HK, P, PS, D), jnp.int8),
  k_scale=jnp.ones((HK, P, PS)),
  v_scale=jnp.ones((HK, P, PS)),
)


def _call(**kw):
  args = dict(ARGS)
  args.update({k: kw.pop(k) for k in list(kw) if k in args})
  return paged_attention(*args.values(), **kw)


@pytest.mark.parametrize(
  ("overrides", "match"),
  [
    (dict(q=jnp.ones((B, H, D), jnp.float16)), "q must be"),
    (dict(v_pages=jnp.ones((HK, P, PS + 1, D))), "must both be"),
    (dict(k_pages=jnp.ones((3, P, PS, D)), v_pages=jnp.ones((3, P, PS, D))), "does not fit"),
    (
      dict(
        k_pages=jnp.ones((HK, P, PS, D), jnp.bfloat16),
        v_pages=jnp.ones((HK, P, PS, D), jnp.bfloat16),
      ),
      "must both be q's",
    ),
    (dict(k_scale=jnp.ones((HK, P, PS))), "only for int8"),
    ({**INT8, "v_scale": None}, "v_scale"),
    ({**INT8, "k_scale": jnp.ones((HK, P))}, "k_scale"),
    (dict(lengths=jnp.ones((B + 1,), jnp.int32)), "lengths"),
    (dict(block_tables=jnp.zeros((B, PPS))), "block_tables"),
    (dict(scale=jnp.float32(1.0)), "scale="),
    (dict(implementation="vllm"), "implementation='vllm'"),
    (dict(block_sizes=4), "BlockSizes"),
    ({**INT8, "implementation": "tpu"}, "page_size=16"),
    (dict(implementation="gpu", block_sizes=BlockSizes(3)), "pages_per_block=3"),
    (
      dict(
        implementation="gpu", k_pages=jnp.ones((HK, P, 12, D)), v_pages=jnp.ones((HK, P, 12, D))
      ),
      "page_size=12",
    ),
  ],
)
def test_bad_arguments_raise_one_line_errors(overrides, match):
  with pytest.raises(ValueError, match=match) as err:
    _call(**overrides)
  assert "\n" not in str(err.value) and str(err.value).startswith("paged_attention: ")


def test_block_sizes_must_be_positive_ints():
  with pytest.raises(ValueError, match="pages_per_block=0"):
    BlockSizes(0)
