"""Paged-attention decode under a mesh: the Pallas kernel of `kernels_pallas.paged_attention`,
one call per device shard.

No decoding engine uses a paged cache yet; this is the layout such an engine would call. XLA cannot
partition a Mosaic kernel, so under a mesh the call runs in a `shard_map` over every mesh axis:
the sequences (q, lengths, block tables) split as the rules split "batch", the heads as they split
"heads" when "kv_heads" is split the same way (each shard keeps whole query groups, and the page
pool [kv_heads, pages, page_size, head_dim] is split on its kv heads only). The pool is not split
by sequence: block tables hold global page ids, so every batch shard sees the whole pool of its kv
heads (a pool per batch shard would need per-shard page ids). Neither split needs a collective.

Axes: q [batch, heads, head_dim]; pages [kv_heads, pages, page_size, head_dim]; scales
[kv_heads, pages, page_size]; lengths [batch]; block tables [batch, pages_per_seq].
"""

import jax
from jax.sharding import PartitionSpec as P

from reslm.kernels_pallas.paged_attention import api
from reslm.models import sharding


def paged_decode(
  q: jax.Array,
  k_pages: jax.Array,
  v_pages: jax.Array,
  lengths: jax.Array,
  block_tables: jax.Array,
  *,
  k_scale: jax.Array | None = None,
  v_scale: jax.Array | None = None,
  **kernel_options,
) -> jax.Array:
  """`kernels_pallas.paged_attention.paged_attention`, per device shard under a mesh.

  Args:
    q, k_pages, v_pages, lengths, block_tables, k_scale, v_scale: As for the kernel API.
    **kernel_options: scale, block_sizes, implementation, interpret (the kernel API's).

  Returns:
    [batch, heads, head_dim] in q's dtype.
  """

  def call(q, k_pages, v_pages, lengths, tables, *scales):
    k_s, v_s = scales or (None, None)
    return api.paged_attention(
      q, k_pages, v_pages, lengths, tables, k_scale=k_s, v_scale=v_s, **kernel_options
    )

  scales = () if k_scale is None else (k_scale, v_scale)
  found = sharding.kernel_mesh()
  if found is None:
    return call(q, k_pages, v_pages, lengths, block_tables, *scales)
  mesh, free = found
  batch = sharding.kernel_split("batch", q.shape[0], mesh=mesh)
  dims = (q.shape[1], k_pages.shape[0])
  heads = sharding.kernel_split("heads", *dims, taken=batch, mesh=mesh)
  if heads != sharding.kernel_split("kv_heads", *dims, taken=batch, mesh=mesh):
    heads = ()
  b, h = sharding.spec_entry(batch), sharding.spec_entry(heads)
  in_specs = (P(b, h), P(h), P(h), P(b), P(b), *([P(h)] * len(scales)))
  return sharding.per_device(call, free, in_specs, P(b, h), mesh=mesh)(
    q, k_pages, v_pages, lengths, block_tables, *scales
  )
